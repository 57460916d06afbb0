"""`meanwise trajectory fetch-data` against an HTTP server on 127.0.0.1 (no machine here reaches
the internet): a tiny synthetic tree with a test-only checksum table always; with the reference
data, ../shared/data served as a mirror and rebuilt in the upstream repositories' layout, every
file checked against the SHA-256 table shipped in the package."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import io
import json
import pickle
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from meanwise import cli
from meanwise.trajectory import fetch
from meanwise.trajectory.data import load_split, resolve_data_dir
from meanwise.trajectory.fetch import FetchError, fetch_data, read_namespace_pickle
from meanwise.trajectory.fetch_manifest import ARGS_PICKLE_SHA256, SHA256


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves `directory`; paths in `corrupt` get one byte flipped (a damaged download)."""

    corrupt: frozenset[str] = frozenset()

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def send_head(self):  # type: ignore[override]
        relative = self.path.lstrip("/")
        if relative not in self.corrupt:
            return super().send_head()
        data = bytearray((Path(self.directory) / relative).read_bytes())
        data[len(data) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(bytes(data))


@contextlib.contextmanager
def _serve(root: Path, corrupt: frozenset[str] = frozenset()) -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"corrupt": corrupt})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]


# --- a tiny synthetic tree: runs everywhere ------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    served = tmp_path / "served"
    files = {
        "eth_ucy/demo/test/a.txt": b"0\t1\t1.5\t2.5\n10\t1\t1.6\t2.4\n",
        "eth_ucy/demo/train/b c.txt": b"0\t2\t0.0\t0.0\n",  # a space: the URL is quoted
        "weights/w.bin": bytes(range(256)) * 40,
    }
    for name, data in files.items():
        (served / name).parent.mkdir(parents=True, exist_ok=True)
        (served / name).write_bytes(data)
    manifest = {name: _sha(data) for name, data in files.items()}
    return served, files, manifest


def test_fetches_verifies_and_resumes(tiny, tmp_path):
    served, files, manifest = tiny
    dest = tmp_path / "dest"
    lines: list[str] = []
    with _serve(served) as url:
        summary = fetch_data(dest, mirror=url, manifest=manifest, log=lines.append)
        assert (summary.downloaded, summary.present, summary.destination) == (3, 0, dest)
        for name, data in files.items():
            assert (dest / name).read_bytes() == data
        assert len(lines) == 3 and all(url in line for line in lines)
        again = fetch_data(dest, mirror=url, manifest=manifest)
        assert (again.downloaded, again.present) == (0, 3)
        # a file damaged on disk is deleted and fetched again
        (dest / "weights/w.bin").write_bytes(b"damaged")
        repaired = fetch_data(dest, mirror=url, manifest=manifest)
        assert (repaired.downloaded, repaired.present) == (1, 2)
        assert (dest / "weights/w.bin").read_bytes() == files["weights/w.bin"]
    assert _leftovers(dest) == []


def test_a_corrupted_download_is_refused_and_deleted(tiny, tmp_path):
    served, _, manifest = tiny
    dest = tmp_path / "dest"
    with _serve(served, corrupt=frozenset({"weights/w.bin"})) as url:
        with pytest.raises(FetchError, match=r"weights/w\.bin: SHA-256 .* refused and deleted"):
            fetch_data(dest, mirror=url, manifest=manifest)
    assert not (dest / "weights/w.bin").exists()
    assert _leftovers(dest) == []  # no temporary left behind
    assert (dest / "eth_ucy/demo/test/a.txt").is_file()  # verified before it: kept


def test_a_missing_file_names_the_url(tiny, tmp_path):
    served, _, manifest = tiny
    manifest = {**manifest, "eth_ucy/demo/val/missing.txt": "0" * 64}
    dest = tmp_path / "dest"
    with _serve(served) as url:
        with pytest.raises(FetchError) as error:
            fetch_data(dest, mirror=url, manifest=manifest)
    message = str(error.value)
    assert message == f"{url}eth_ucy/demo/val/missing.txt: HTTP 404 File not found"
    assert not (dest / "eth_ucy/demo/val/missing.txt").exists() and _leftovers(dest) == []


def test_unreachable_mirror_bad_url_and_bad_destination(tiny, tmp_path):
    _, _, manifest = tiny
    # a port nobody listens on: connection refused, one line naming the URL
    with _serve(tmp_path) as url:
        pass  # the server is shut down on leaving: its port is now closed
    with pytest.raises(FetchError, match=r"^http://127\.0\.0\.1:\d+/eth_ucy/.*cannot download"):
        fetch_data(tmp_path / "dest", mirror=url, manifest=manifest, timeout=5)
    with pytest.raises(ValueError, match="expected an http://, https:// or file:// URL"):
        fetch_data(tmp_path / "dest", mirror="ftp://example.org/data", manifest=manifest)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        fetch_data(blocker, mirror=url, manifest=manifest)
    with pytest.raises(ValueError, match="not writable"):
        fetch_data(blocker / "sub", mirror=url, manifest=manifest)
    with pytest.raises(ValueError, match="manifest needs mirror"):
        fetch_data(tmp_path / "dest", manifest=manifest)


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, fragment in [
        (["--mirror", "ftp://example.org/x"], "argument --mirror: expected an http://"),
        (["--mirror", "http://"], "argument --mirror: expected an http://"),
        (["--dest", str(blocker / "sub")], "argument --dest:"),
        (["--dest", str(blocker)], "is a file; expected a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["trajectory", "fetch-data", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with _serve(empty) as url:
        argv = ["trajectory", "fetch-data", "--dest", str(tmp_path / "d"), "--mirror", url]
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    first = fetch.planned_files()[0]
    assert err == f"meanwise: {url}{first}: HTTP 404 File not found"


# --- the authors' args.pkl, read without unpickling ----------------------------------------------


def test_namespace_pickle_is_read_without_executing_anything():
    values = {"dataset": "eth", "lr": 1.0, "epochs": 50, "big": 2**40, "clip": None, "on": True}
    data = pickle.dumps(argparse.Namespace(**values), protocol=3)
    assert read_namespace_pickle(data) == values

    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    with pytest.raises(ValueError, match="evil.pkl: not a pickled argparse.Namespace"):
        read_namespace_pickle(pickle.dumps(Boom(), protocol=3), "evil.pkl")
    nested = pickle.dumps(argparse.Namespace(bins=[0, 0.1]), protocol=3)
    with pytest.raises(ValueError, match="plain values"):
        read_namespace_pickle(nested)


# --- with the reference data: the shipped table, end to end --------------------------------------


@pytest.fixture(scope="module")
def shared_root() -> Path:
    root = resolve_data_dir()
    if root is None or not all((root / p).is_file() for p in SHA256):
        pytest.skip(
            "the reference data (../shared/data or $MEANWISE_DATA_DIR, with eth_ucy/ and "
            "social_implicit_checkpoints/) is not here: the loopback fetch of the shipped "
            "table needs it (`meanwise trajectory fetch-data --checkpoints` makes one)"
        )
    return root


def test_shipped_table_matches_the_reference_files(shared_root):
    on_disk = {
        p.relative_to(shared_root).as_posix() for p in (shared_root / "eth_ucy").rglob("*.txt")
    }
    assert on_disk <= set(SHA256)  # every split file is listed
    assert len(fetch.planned_files()) == len(on_disk) == 175
    assert len(fetch.planned_files(checkpoints=True)) == 187


def test_fetch_from_a_loopback_mirror_of_shared_data(shared_root, tmp_path, monkeypatch):
    dest = tmp_path / "data"
    with _serve(shared_root) as url:
        summary = fetch_data(dest, mirror=url, checkpoints=True)
    assert (summary.downloaded, summary.present) == (187, 0)
    for path, digest in SHA256.items():
        assert _sha((dest / path).read_bytes()) == digest == _sha((shared_root / path).read_bytes())
    # the loaders find the fetched folder by --data-dir and by $MEANWISE_DATA_DIR
    assert len(load_split("eth", "test", dest)) == 70
    monkeypatch.setenv("MEANWISE_DATA_DIR", str(dest))
    assert resolve_data_dir() == dest and len(load_split("zara1", "test")) == 602


def _upstream_tree(shared_root: Path, tree: Path) -> None:
    """../shared/data laid out as the two upstream repositories are (links to the files), with
    the authors' args.pkl re-created from args.json (protocol 3 pickles of the Namespace give
    the released bytes, which the shipped table checks)."""
    for path in SHA256:
        url = fetch.upstream_url(path)
        for base in (fetch.SOCIAL_STGCNN_BASE, fetch.SOCIAL_IMPLICIT_BASE):
            if url.startswith(base):
                target = tree / url[len(base) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith("args.json"):
            args = json.loads((shared_root / path).read_text())
            target.write_bytes(pickle.dumps(argparse.Namespace(**args), protocol=3))
            assert _sha(target.read_bytes()) == ARGS_PICKLE_SHA256[path.split("/")[1]]
        else:
            target.symlink_to(shared_root / path)


def test_fetch_in_the_upstream_layout(shared_root, tmp_path, monkeypatch):
    tree = tmp_path / "upstream"
    _upstream_tree(shared_root, tree)
    with _serve(tree) as url:
        monkeypatch.setattr(fetch, "SOCIAL_STGCNN_BASE", url)
        monkeypatch.setattr(fetch, "SOCIAL_IMPLICIT_BASE", url)
        dest = tmp_path / "data"
        summary = fetch_data(dest, checkpoints=True)
        assert summary.downloaded == 187
        for path, digest in SHA256.items():
            assert _sha((dest / path).read_bytes()) == digest
        # args.json, derived from the pickle, is byte-identical to the reference conversion
        assert (dest / "social_implicit_checkpoints/univ/args.json").read_bytes() == (
            shared_root / "social_implicit_checkpoints/univ/args.json"
        ).read_bytes()
        # a damaged args.pkl upstream is refused like any other file
        (dest / "social_implicit_checkpoints/eth/args.json").unlink()
        pkl = tree / "checkpoint/social-implicit-eth/args.pkl"
        pkl.write_bytes(pkl.read_bytes().replace(b"ReLU", b"ReLu"))
        with pytest.raises(FetchError, match=r"social-implicit-eth/args\.pkl: SHA-256"):
            fetch_data(dest, checkpoints=True)
        assert not (dest / "social_implicit_checkpoints/eth/args.json").exists()


def test_cli_fetch_says_where_the_files_are(shared_root, tmp_path, capsys):
    dest = tmp_path / "data"
    with _serve(shared_root) as url:
        argv = ["trajectory", "fetch-data", "--dest", str(dest), "--mirror", url]
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "175 file(s) downloaded and 0 already present, all SHA-256 verified" in out
    assert f"--data-dir {dest}" in out and f"MEANWISE_DATA_DIR={dest}" in out
    assert not (dest / "social_implicit_checkpoints").exists()  # weights only with --checkpoints
