"""`meanwise trajectory fetch-data`: download the ETH/UCY (and SDD) split files and, optionally,
the released Social-Implicit weights, each checked against the SHA-256 in `fetch_manifest`.

Where the files come from (raw GitHub URLs at pinned commits, so the checksums stay valid):

- ETH/UCY (`eth_ucy/{eth,hotel,univ,zara1,zara2}/{train,val,test}/`, `eth_ucy/raw/`): the
  `datasets/` folder of Social-STGCNN (Mohamed et al., CVPR 2020), which redistributes
  Social-GAN's split files; Social-Implicit ships byte-identical copies.
- SDD (`eth_ucy/sdd/`) and the released weights (`social_implicit_checkpoints/<split>/`):
  Social-Implicit (Mohamed et al., ECCV 2022), `datasets/sdd/` and
  `checkpoint/social-implicit-<split>/`. The authors ship the training arguments as a pickle
  (`args.pkl`); it is read with `pickletools`' opcode reader (nothing is imported or executed)
  and written as `args.json`, whose SHA-256 is checked like any other file.

`--mirror URL` replaces all of these by one base URL that serves the data folder's own layout
(`URL/eth_ucy/eth/test/biwi_eth.txt`, `URL/social_implicit_checkpoints/eth/args.json`, ...),
e.g. a lab's copy of a fetched folder served over HTTP, or a `file://` folder.

Every file is streamed into a temporary file beside its destination, hashed on the way, and
renamed into place only when its SHA-256 matches; a mismatch deletes the temporary and stops
with an error naming the URL. Files already present with the right checksum are kept; present
with a wrong one, they are deleted and downloaded again. Afterwards every listed file under the
destination is either verified or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from meanwise.atomic_io import atomic_write_bytes, atomic_writer
from meanwise.trajectory.fetch_manifest import ARGS_PICKLE_SHA256, SHA256

__all__ = [
    "FetchError",
    "FetchSummary",
    "SOCIAL_STGCNN_BASE",
    "SOCIAL_IMPLICIT_BASE",
    "default_destination",
    "fetch_data",
    "planned_files",
    "read_namespace_pickle",
    "upstream_url",
]

SOCIAL_STGCNN_BASE = (
    "https://raw.githubusercontent.com/abduallahmohamed/Social-STGCNN/"
    "333d3a57b4d2705e129b21aefefa09c79b2b9ae1/"
)
SOCIAL_IMPLICIT_BASE = (
    "https://raw.githubusercontent.com/abduallahmohamed/Social-Implicit/"
    "02d6a1483d60267acbe7e8caf229f96d6d4921ba/"
)
_CHECKPOINTS = "social_implicit_checkpoints/"
_MAX_BYTES = 64 << 20  # the largest listed file is a few MB; refuse anything absurd
_CHUNK = 1 << 20


class FetchError(ValueError):
    """A download failed or did not verify (one line, naming the URL or file)."""


@dataclass(frozen=True)
class FetchSummary:
    destination: Path
    downloaded: int
    present: int


def default_destination() -> Path:
    """$MEANWISE_DATA_DIR if set, else $XDG_CACHE_HOME/meanwise/data (~/.cache/meanwise/data),
    a folder `meanwise.trajectory.data.resolve_data_dir` also searches."""
    from meanwise.trajectory.data import DATA_DIR_ENV, user_data_dir

    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else user_data_dir()


def planned_files(checkpoints: bool = False) -> list[str]:
    """The data-folder paths fetched: every split file, plus the released weights if asked."""
    return sorted(p for p in SHA256 if checkpoints or not p.startswith(_CHECKPOINTS))


def upstream_url(path: str) -> str:
    """Where `path` (a data-folder path from the manifest) is downloaded from by default; for
    `args.json`, the URL of the `args.pkl` it is derived from."""
    parts = path.split("/")
    if parts[0] == "eth_ucy":
        if parts[1] == "raw":
            return SOCIAL_STGCNN_BASE + "datasets/raw/all_data/" + parts[2]
        base = SOCIAL_IMPLICIT_BASE if parts[1] == "sdd" else SOCIAL_STGCNN_BASE
        return base + "datasets/" + "/".join(parts[1:])
    split, name = parts[1], parts[2]
    name = "args.pkl" if name == "args.json" else name
    return f"{SOCIAL_IMPLICIT_BASE}checkpoint/social-implicit-{split}/{name}"


def check_mirror(url: str) -> str:
    """The mirror's base URL with a final slash; a ValueError unless http(s):// or file://."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file") or (
        parsed.scheme != "file" and not parsed.netloc
    ):
        raise ValueError(f"expected an http://, https:// or file:// URL; got {url!r}")
    return url if url.endswith("/") else url + "/"


# --- reading the authors' args.pkl without unpickling it ---------------------------------------

_SCALARS = {
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG1",
    "BINFLOAT",
}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_STRUCTURE = {
    "PROTO",
    "FRAME",
    "BINPUT",
    "LONG_BINPUT",
    "MEMOIZE",
    "EMPTY_TUPLE",
    "NEWOBJ",
    "EMPTY_DICT",
    "MARK",
    "SETITEMS",
    "SETITEM",
    "BUILD",
    "STOP",
}


def read_namespace_pickle(data: bytes, name: str = "args.pkl") -> dict[str, object]:
    """The attributes of a pickled `argparse.Namespace` of plain values (str, int, float, bool,
    None), read opcode by opcode with `pickletools.genops`: nothing is imported or executed,
    and anything but that shape is refused with a ValueError naming `name`."""
    values: list[object] = []
    found_class = False
    try:
        for opcode, arg, _ in pickletools.genops(data):
            op = opcode.name
            if op in _SCALARS:
                values.append(arg)
            elif op in _CONSTANTS:
                values.append(_CONSTANTS[op])
            elif op == "GLOBAL" and arg == "argparse Namespace":
                found_class = True
            elif op not in _STRUCTURE:
                raise ValueError(f"opcode {op}")
    except ValueError as error:
        raise ValueError(
            f"{name}: not a pickled argparse.Namespace of plain values ({error})"
        ) from None
    if not found_class or len(values) % 2:
        raise ValueError(f"{name}: not a pickled argparse.Namespace of plain values")
    keys, items = values[0::2], values[1::2]
    if not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{name}: attribute names must be strings")
    return dict(zip(keys, items, strict=True))  # type: ignore[arg-type]


# --- downloading ---------------------------------------------------------------------------------


def _opener(url: str) -> Callable[..., object]:
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        # a loopback mirror must not go through an http_proxy from the environment
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open
    return urllib.request.urlopen


def _chunks(url: str, timeout: float) -> Iterable[bytes]:
    """The body of `url` in chunks; a FetchError (one line, naming the URL) on any failure."""
    try:
        response = _opener(url)(url, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise FetchError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise FetchError(f"{url}: cannot download ({error.reason})") from None
    except (OSError, ValueError) as error:
        raise FetchError(f"{url}: cannot download ({error})") from None
    total = 0
    with response:  # type: ignore[attr-defined]
        while True:
            try:
                chunk = response.read(_CHUNK)  # type: ignore[attr-defined]
            except OSError as error:
                raise FetchError(f"{url}: download interrupted ({error})") from None
            if not chunk:
                return
            total += len(chunk)
            if total > _MAX_BYTES:
                raise FetchError(f"{url}: larger than {_MAX_BYTES >> 20} MiB; refused")
            yield chunk


def _mismatch(url: str, got: str, expected: str) -> FetchError:
    return FetchError(
        f"{url}: SHA-256 {got[:16]}... does not match the expected {expected[:16]}...; "
        "the file was refused and deleted"
    )


def _download(url: str, target: Path, expected: str, timeout: float) -> None:
    """Stream `url` into `target` atomically; nothing is left unless the SHA-256 matches."""
    digest = hashlib.sha256()
    with atomic_writer(target) as handle:  # an exception inside deletes the temporary
        for chunk in _chunks(url, timeout):
            digest.update(chunk)
            handle.write(chunk)
        if digest.hexdigest() != expected:
            raise _mismatch(url, digest.hexdigest(), expected)


def _download_args_json(url: str, target: Path, split: str, timeout: float) -> None:
    """The released args.pkl, verified, converted to the args.json the loader reads."""
    data = b"".join(_chunks(url, timeout))
    got = hashlib.sha256(data).hexdigest()
    if got != ARGS_PICKLE_SHA256[split]:
        raise _mismatch(url, got, ARGS_PICKLE_SHA256[split])
    text = json.dumps(read_namespace_pickle(data, url), indent=1).encode()
    expected = SHA256[f"{_CHECKPOINTS}{split}/args.json"]
    if hashlib.sha256(text).hexdigest() != expected:
        raise FetchError(f"{url}: its args.json form does not match the expected SHA-256")
    atomic_write_bytes(target, text)


def _verified(path: Path, expected: str) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected


def fetch_data(
    destination: str | os.PathLike[str] | None = None,
    *,
    mirror: str | None = None,
    checkpoints: bool = False,
    timeout: float = 60.0,
    manifest: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> FetchSummary:
    """Download the listed files into `destination` (default `default_destination()`).

    Args:
        mirror: a base URL serving the data folder's layout instead of the upstream URLs.
        checkpoints: also the released Social-Implicit weights (`val_best.pth`, `args.json`).
        manifest: {data-folder path: SHA-256} to fetch instead of the shipped table (only with
            `mirror`; for tests and private data sets).
        log: called with one line per downloaded file.

    Raises:
        FetchError: a download failed or its checksum did not match (the first such file;
            files verified before it stay, and a rerun skips them).
        ValueError: a bad `mirror` URL, or a destination that is not a writable folder.
    """
    base = check_mirror(mirror) if mirror is not None else None
    if manifest is not None and base is None:
        raise ValueError("manifest needs mirror (the upstream URLs only serve the shipped table)")
    table = manifest if manifest is not None else SHA256
    paths = sorted(table) if manifest is not None else planned_files(checkpoints)
    root = Path(destination).expanduser() if destination is not None else default_destination()
    _check_destination(root)
    downloaded = present = 0
    for path in paths:
        target = root / path
        expected = table[path]
        if _verified(target, expected):
            present += 1
            continue
        if target.exists():
            target.unlink()  # a wrong checksum: never leave it where a loader would read it
        if base is not None:
            url = base + urllib.parse.quote(path)
            _download(url, target, expected, timeout)
        elif path.endswith("/args.json"):
            url = upstream_url(path)
            _download_args_json(url, target, path.split("/")[1], timeout)
        else:
            url = upstream_url(path)
            _download(url, target, expected, timeout)
        downloaded += 1
        if log is not None:
            log(f"{path} <- {url}")
    return FetchSummary(root, downloaded, present)


def _check_destination(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"destination {str(root)!r} is a file; expected a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".meanwise-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"destination {str(root)!r} is not writable ({error.strerror or error})"
        ) from None
