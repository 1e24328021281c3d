"""Downloads against a loopback HTTP server: resume, checksums, errors, progress, the Premchand recipe."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ssmlm.data.download import (
    build_premchand,
    download_file,
    ensure_files,
    premchand_split,
    sidecar,
)
from ssmlm.errors import DataError

PAYLOAD = bytes(range(256)) * 4000 + "हिन्दी\n".encode() * 100  # ~1 MB, crosses the 1 MiB read size


class FileServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with HTTP Range support and a request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.ignore_range = False
        self.cut_after: int | None = None  # close the connection after this many body bytes, once
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and not server.ignore_range else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if server.cut_after is not None:
                    chunk, server.cut_after = chunk[:server.cut_after], None
                    self.wfile.write(chunk)
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    s.files["/data/file.bin"] = PAYLOAD
    yield s
    s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_records_sha256_and_leaves_no_part(server, tmp_path):
    dest = download_file(server.base + "/data/file.bin", tmp_path / "sub" / "file.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "file.bin.part").exists()
    assert sidecar(dest).read_text() == f"{sha(PAYLOAD)}  file.bin\n"


def test_resume_sends_range_and_completes(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:300_000])
    download_file(server.base + "/data/file.bin", dest, sha256=sha(PAYLOAD), progress=False)
    assert server.requests == [("/data/file.bin", "bytes=300000-")]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_part_and_next_call_resumes(server, tmp_path):
    dest, url = tmp_path / "file.bin", server.base + "/data/file.bin"
    server.cut_after = 123_456
    with pytest.raises(DataError, match="resumes it"):
        download_file(url, dest, progress=False)
    assert (tmp_path / "file.bin.part").stat().st_size == 123_456 and not dest.exists()
    download_file(url, dest, sha256=sha(PAYLOAD), progress=False)
    assert server.requests[-1] == ("/data/file.bin", "bytes=123456-")
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "file.bin.part").write_bytes(b"garbage that must not stay at the front")
    download_file(server.base + "/data/file.bin", tmp_path / "file.bin", sha256=sha(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD


def test_complete_part_file_is_finalised_on_416(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    download_file(server.base + "/data/file.bin", tmp_path / "file.bin", sha256=sha(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_an_error_and_deletes_the_part(server, tmp_path):
    with pytest.raises(DataError) as err:
        download_file(server.base + "/data/file.bin", tmp_path / "file.bin", sha256="0" * 64, progress=False)
    assert sha(PAYLOAD) in str(err.value) and "0" * 64 in str(err.value)
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.part").exists()


def test_offline_error_names_file_url_and_local_fix(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/TinyStories-train.txt"
    dest = tmp_path / "TinyStories-train.txt"
    with pytest.raises(DataError) as err:
        ensure_files({"data.train_path": dest}, [{"path": str(dest), "url": url, "sha256": None}], download=True,
                     progress=False)
    msg = str(err.value)
    assert msg.startswith("data.train_path:") and str(dest) in msg and url in msg
    assert "data.train_path=" in msg and "SSMLM_DATA_DIR" in msg


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(server.base + "/nope.txt", tmp_path / "nope.txt", progress=False)


def test_progress_bar_reports_the_transfer(server, tmp_path, capfd):
    download_file(server.base + "/data/file.bin", tmp_path / "file.bin", progress=True)
    err = capfd.readouterr().err
    assert "download file.bin" in err and "100%" in err


def test_missing_file_without_download_says_how_to_fix(tmp_path):
    dest = tmp_path / "train.txt"
    with pytest.raises(DataError) as err:
        ensure_files({"data.train_path": dest}, [{"path": str(dest), "url": "http://x/train.txt"}], download=False)
    msg = str(err.value)
    assert str(dest) in msg and "data.download=true" in msg and "http://x/train.txt" in msg


def test_a_file_no_source_names_is_never_fetched(server, tmp_path):
    other = tmp_path / "mine" / "train.txt"
    sources = [{"path": str(tmp_path / "train.txt"), "url": server.base + "/data/file.bin"}]
    with pytest.raises(DataError, match="file not found"):
        ensure_files({"data.train_path": other}, sources, download=True, progress=False)
    assert server.requests == []


def test_read_only_directory_is_reported_before_any_request(server, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    dest = ro / "sub" / "file.bin"
    try:
        with pytest.raises(DataError, match="read-only"):
            ensure_files({"data.train_path": dest}, [{"path": str(dest), "url": server.base + "/data/file.bin"}],
                         download=True, progress=False)
        assert server.requests == [] and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_fetched_file_is_verified_on_later_use(server, tmp_path):
    dest = tmp_path / "file.bin"
    sources = [{"path": str(dest), "url": server.base + "/data/file.bin", "sha256": None}]
    ensure_files({"data.train_path": dest}, sources, download=True, progress=False)
    ensure_files({"data.train_path": dest}, sources, download=True, progress=False)  # unchanged: fine
    assert len(server.requests) == 1
    dest.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(DataError, match="changed since it was downloaded"):
        ensure_files({"data.train_path": dest}, sources, download=True, progress=False)


# ---------------------------------------------------------------------------------------- Premchand recipe
STORIES = {f"story-{i:03d}.txt": f"  \r\nकहानी {i}: पहली पंक्ति।\r\n\r\nदूसरा अनुच्छेद {i}।\n\n  " for i in range(23)}


def expected_splits() -> dict[str, bytes]:
    """The split rule of SOURCES.md, written out independently of the code under test."""
    parts = {"train.txt": [], "valid.txt": [], "test.txt": []}
    for i, name in enumerate(sorted(STORIES)):
        text = STORIES[name].replace("\r\n", "\n").strip()
        parts["valid.txt" if i % 10 == 8 else "test.txt" if i % 10 == 9 else "train.txt"].append(text)
    return {name: ("\n\n".join(texts) + "\n").encode() for name, texts in parts.items()}


def premchand_source(server: FileServer, out_dir: Path, hashes: dict[str, str]) -> dict:
    listing = [{"name": n, "type": "file"} for n in [*sorted(STORIES, reverse=True), "combined_data.txt",
                                                       "ix2tok.json"]] + [{"name": "sub", "type": "dir"}]
    server.files["/repos/owner/repo/contents/input"] = json.dumps(listing).encode()
    for name, text in STORIES.items():
        server.files[f"/owner/repo/abc123/input/{name}"] = text.encode()
    return {"recipe": "premchand", "dir": str(out_dir), "repo": "owner/repo", "commit": "abc123",
            "sha256": hashes, "list_url": server.base + "/repos/{repo}/contents/input?ref={commit}",
            "raw_url": server.base + "/{repo}/{commit}/input/{name}"}


def test_premchand_recipe_assembles_the_split_exactly(server, tmp_path):
    want = expected_splits()
    source = premchand_source(server, tmp_path, {name: sha(data) for name, data in want.items()})
    paths = {f"data.{k}_path": tmp_path / f for k, f in [("train", "train.txt"), ("val", "valid.txt"),
                                                         ("test", "test.txt")]}
    ensure_files(paths, [source], download=True, progress=False)
    for name, data in want.items():
        assert (tmp_path / name).read_bytes() == data
    assert not any(p.name.startswith(".premchand") for p in tmp_path.iterdir())  # story files cleaned up
    assert "/owner/repo/abc123/input/combined_data.txt" not in {p for p, _ in server.requests}


def test_premchand_recipe_with_wrong_hash_writes_nothing(server, tmp_path):
    want = expected_splits()
    hashes = {name: sha(data) for name, data in want.items()} | {"test.txt": "f" * 64}
    with pytest.raises(DataError, match="test.txt"):
        build_premchand(premchand_source(server, tmp_path, hashes), progress=False)
    assert not any((tmp_path / name).exists() for name in want)


def test_premchand_split_rule_matches_sources_md():
    """The first 99 story files of the real repository (in listing order) land where SOURCES.md says."""
    names = """aabhushan aadhar aap-beeti adarsh-virodh adhikar-chinta agni-samadhi akhiri-heela algyojha
    amawasya-ki-raat ansuon-ki-holi anubhav atmaram atmsangeet baasi-bhaat-mein-khuda-ka-sajha baba-ji-ka-bhog
    bade-bhaisahab bade-ghar-ki-beti bahishkar balak balidan bank-ka-diwala baudam beti-ka-dhan beton-wali-vidhva
    bhaadey-ka-tattoo bodh brahm-ka-swaang budhi-kaki chakma chori daftari damul-ka-kaidi dand decree-ke-rupaye
    deeksha dharm-sankat dhikkar dhikkar1 dhokha dil-ki-rani do-bhai do-kabren duraga-ka-mandir dussahas eidgah
    ek-aanch-ki-kasar fatiha gareeb-ki-haay ghaas-wali ghar-jamai gila griha-daah gulli-danda gupt-dhan guru-mantra
    haar-ki-jeet hinsa-param-dharm ishvareey-nyay isteefa jail jhanki jihad jugnu-ki-chamak juloos jwalamukhi jyoti
    kamna-taru kaptan-sahab kaushal kazaki khoon-safed kshama laag-daat laila lanchan lanchhan lokmat-ka-samman maa
    mahateerth maiku mamta mandir manovritti mantra-2 manushya-ka-param-dharm maryada-ki-vedi mata-ka-hriday mooth
    mrityu-ke-peechhe muft-ka-yash mukti-marg muktidhan nag-puja nairashya-leela nairashya namak-ka-daroga
    narak-ka-marg nasha nimantran""".split()
    splits = premchand_split([f"{n}.txt" for n in reversed(names)])
    assert [n[:-4] for n in splits["valid.txt"]] == ["amawasya-ki-raat", "balak", "chakma", "dhokha", "ghaas-wali",
                                                     "isteefa", "kaushal", "mahateerth", "mrityu-ke-peechhe",
                                                     "nimantran"]
    assert [n[:-4] for n in splits["test.txt"]] == ["ansuon-ki-holi", "balidan", "chori", "dil-ki-rani", "ghar-jamai",
                                                    "jail", "kazaki", "maiku", "muft-ka-yash"]
    assert len(splits["train.txt"]) == 80
