"""Where data files come from: the built-in corpus, and downloads (pooch for URLs, huggingface_hub for the Hub)
against a loopback HTTP server: checksums, nothing half-written, errors, progress, the Premchand recipe."""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ssmlm.data import builtin_corpus
from ssmlm.data.download import build_premchand, download_hf, download_url, premchand_split, resolve_files
from ssmlm.errors import DataError
from tiny_runs import TINY, cli_env, run_cli

PAYLOAD = bytes(range(256)) * 4000 + "हिन्दी\n".encode() * 100  # ~1 MB, crosses the 1 MiB read size


class FileServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with HTTP Range support and a request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: int | None = None  # close the connection after this many body bytes, once
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):  # what hf_hub_download asks first: the commit, an ETag and the size
                server.requests.append(("HEAD " + self.path, None))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "c0ffee" * 6 + "c0ff")
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
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


def closed_port_url(name: str) -> str:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{name}"


# ------------------------------------------------------------------------------------------ URLs (pooch)
def test_url_download_is_checksummed_and_leaves_only_the_file(server, tmp_path):
    dest = download_url(server.base + "/data/file.bin", tmp_path / "sub" / "file.bin", sha256=sha(PAYLOAD),
                        progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["file.bin"]
    download_url(server.base + "/data/file.bin", dest, sha256=sha(PAYLOAD), progress=False)
    assert len(server.requests) == 1  # present and matching: not fetched again


def test_checksum_mismatch_is_an_error_and_keeps_nothing(server, tmp_path):
    with pytest.raises(DataError) as err:
        download_url(server.base + "/data/file.bin", tmp_path / "file.bin", sha256="0" * 64, progress=False)
    assert sha(PAYLOAD) in str(err.value) and "0" * 64 in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing_half_written(server, tmp_path):
    url = server.base + "/data/file.bin"
    server.cut_after = 123_456
    with pytest.raises(DataError, match="could not download"):
        download_url(url, tmp_path / "file.bin", progress=False)
    assert list(tmp_path.iterdir()) == []
    download_url(url, tmp_path / "file.bin", sha256=sha(PAYLOAD), progress=False)  # the next try completes
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD


def test_offline_error_names_file_url_and_local_fix(tmp_path):
    url = closed_port_url("TinyStories-train.txt")
    dest = tmp_path / "TinyStories-train.txt"
    with pytest.raises(DataError) as err:
        resolve_files({"data.train_path": dest}, [{"path": str(dest), "url": url, "sha256": None}], download=True,
                      progress=False)
    msg = str(err.value)
    assert msg.startswith("data.train_path:") and str(dest) in msg and url in msg
    assert "data.train_path=" in msg and "SSMLM_DATA_DIR" in msg
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_url(server.base + "/nope.txt", tmp_path / "nope.txt", progress=False)


def test_progress_bar_reports_the_transfer(server, tmp_path, capfd):
    download_url(server.base + "/data/file.bin", tmp_path / "file.bin", progress=True)
    err = capfd.readouterr().err
    assert "download file.bin" in err and "100%" in err


def test_missing_file_without_download_says_how_to_fix(tmp_path):
    dest = tmp_path / "train.txt"
    with pytest.raises(DataError) as err:
        resolve_files({"data.train_path": dest}, [{"path": str(dest), "url": "http://x/train.txt"}], download=False)
    msg = str(err.value)
    assert str(dest) in msg and "data.download=true" in msg and "http://x/train.txt" in msg


def test_a_file_no_source_names_is_never_fetched(server, tmp_path):
    other = tmp_path / "mine" / "train.txt"
    sources = [{"path": str(tmp_path / "train.txt"), "url": server.base + "/data/file.bin"}]
    with pytest.raises(DataError, match="file not found"):
        resolve_files({"data.train_path": other}, sources, download=True, progress=False)
    assert server.requests == []


def test_read_only_directory_is_reported_before_any_request(server, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    dest = ro / "sub" / "file.bin"
    try:
        with pytest.raises(DataError, match="read-only"):
            resolve_files({"data.train_path": dest}, [{"path": str(dest), "url": server.base + "/data/file.bin"}],
                          download=True, progress=False)
        assert server.requests == [] and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_fetched_file_is_verified_on_later_use(server, tmp_path):
    dest = tmp_path / "file.bin"
    sources = [{"path": str(dest), "url": server.base + "/data/file.bin", "sha256": sha(PAYLOAD)}]
    assert resolve_files({"data.train_path": dest}, sources, download=True, progress=False) == {
        "data.train_path": dest}
    resolve_files({"data.train_path": dest}, sources, download=True, progress=False)  # unchanged: fine
    assert len(server.requests) == 1
    dest.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(DataError, match="changed since it was downloaded"):
        resolve_files({"data.train_path": dest}, sources, download=True, progress=False)


# ----------------------------------------------------------------------------- Hugging Face Hub (HF_ENDPOINT)
HF_FILE = "/datasets/owner/stories/resolve/main/stories-train.txt"


def test_hub_download_lands_at_the_configured_path(server, tmp_path):
    server.files[HF_FILE] = PAYLOAD
    dest = tmp_path / "stories" / "stories-train.txt"
    download_hf("owner/stories", "stories-train.txt", dest, revision="main", endpoint=server.base, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert {p.name for p in dest.parent.iterdir()} == {"stories-train.txt", ".cache"}  # .cache: the Hub's resume data


def test_hub_download_cut_short_is_completed_and_never_half_written(server, tmp_path):
    server.files[HF_FILE] = PAYLOAD
    server.cut_after = 200_000
    dest = tmp_path / "stories-train.txt"
    download_hf("owner/stories", "stories-train.txt", dest, revision="main", endpoint=server.base, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert sum(1 for path, _ in server.requests if not path.startswith("HEAD")) == 2  # cut, then completed


def test_hub_error_names_the_file_and_the_local_fix(server, tmp_path):
    dest = tmp_path / "stories-train.txt"
    with pytest.raises(DataError) as err:  # the server has no such file: HTTP 404
        resolve_files({"data.train_path": dest}, [{"path": str(dest), "hf_repo": "owner/stories",
                                                   "endpoint": server.base}], download=True, progress=False)
    msg = str(err.value)
    assert str(dest) in msg and "owner/stories" in msg and "SSMLM_DATA_DIR" in msg
    assert not dest.exists()


def test_hub_download_with_the_wrong_checksum_is_removed_on_arrival(server, tmp_path):
    server.files[HF_FILE] = PAYLOAD
    dest = tmp_path / "stories-train.txt"
    source = {"path": str(dest), "hf_repo": "owner/stories", "endpoint": server.base, "sha256": "0" * 64}
    with pytest.raises(DataError, match="(?s)owner/stories.*sha256.*removed"):
        resolve_files({"data.train_path": dest}, [source], download=True, progress=False)
    assert not dest.exists()
    source["sha256"] = hashlib.sha256(PAYLOAD).hexdigest()
    assert resolve_files({"data.train_path": dest}, [source], download=True, progress=False) == {
        "data.train_path": dest}
    assert dest.read_bytes() == PAYLOAD


def tinystories_like(n: int) -> bytes:
    return "".join(f"Story {i}: once upon a time a cat sat.\n<|endoftext|>\n" for i in range(n)).encode()


TINY_RUN = [*TINY, "data=tinystories_bytes", "hardware=cpu", "logger=csv", "trainer.max_steps=2",
            "trainer.max_epochs=1", "callbacks.text_samples=null"]


def test_cli_downloads_tinystories_through_hf_endpoint_then_trains(server, tmp_path):
    """The real CLI with HF_ENDPOINT at a loopback server: both files downloaded into the data dir, a run."""
    base = "/datasets/roneneldan/TinyStories/resolve/main/"
    server.files[base + "TinyStories-train.txt"] = tinystories_like(400)
    server.files[base + "TinyStories-valid.txt"] = tinystories_like(50)
    data, out = tmp_path / "data", tmp_path / "run"
    proc = run_cli(*TINY_RUN, f"hydra.run.dir={out}",
                   env=cli_env(SSMLM_DATA_DIR=str(data), HF_ENDPOINT=server.base, HF_HUB_OFFLINE="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (data / "tinystories" / "TinyStories-train.txt").read_bytes() == tinystories_like(400)
    assert (out / "results.json").exists()
    assert not list((data / "tinystories").glob("*.u16.bin*"))  # the token caches went to the cache dir


def test_cli_offline_without_tinystories_is_one_clear_message(tmp_path):
    data = tmp_path / "data"
    proc = run_cli(*TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}",
                   env=cli_env(SSMLM_DATA_DIR=str(data), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = proc.stderr + proc.stdout
    assert str(data / "tinystories" / "TinyStories-train.txt") in msg and "offline" in msg
    assert "SSMLM_DATA_DIR" in msg and "Traceback" not in msg
    assert not data.exists()  # nothing half-written, not even the folders the download created


# ------------------------------------------------------------------------------------------ built-in corpus
PREMCHAND_FILES = ("train.txt", "valid.txt", "test.txt")


def test_builtin_corpus_stands_in_for_missing_files_without_network(server, tmp_path, caplog):
    data_dir, cache = tmp_path / "data" / "hindi" / "premchand", tmp_path / "cache"
    recipe = premchand_source(server, data_dir, {name: "0" * 64 for name in PREMCHAND_FILES})
    required = {f"data.{k}_path": data_dir / name for k, name in zip(("train", "val", "test"), PREMCHAND_FILES)}
    with caplog.at_level(logging.INFO, logger="ssmlm.data.download"):
        found = resolve_files(required, [{"builtin": "hindi/premchand", "dir": str(data_dir)}, recipe],
                              download=True, cache_dir=cache, progress=False)
    assert server.requests == [] and not (tmp_path / "data").exists()  # no download, nothing in the data dir
    for key, name in zip(required, PREMCHAND_FILES):
        assert found[key] == cache / "builtin" / "hindi" / "premchand" / name
        assert sha(found[key].read_bytes()) == builtin_corpus.checksums()[f"hindi/premchand/{name}"]
    assert "built into ssmlm" in caplog.text and str(required["data.train_path"]) in caplog.text


def test_cli_default_data_without_a_data_dir_trains_on_the_builtin_corpus(tmp_path):
    """The real CLI, no Hindi files under SSMLM_DATA_DIR and no network: the built-in copy is used, and said so."""
    data, out, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    proc = run_cli(*TINY, "hardware=cpu", "logger=csv", "trainer.max_steps=2", "trainer.max_epochs=1",
                   "callbacks.text_samples=null", f"hydra.run.dir={out}",
                   env=cli_env(SSMLM_DATA_DIR=str(data), SSMLM_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").exists() and not data.exists()
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "using the copy built into ssmlm" in log and str(cache / "builtin/hindi/premchand/train.txt") in log
    assert sorted(p.name for p in (cache / "builtin/hindi/premchand").iterdir()) == sorted(PREMCHAND_FILES)


def test_builtin_corpus_matches_the_published_split():
    """The shipped files are the split of ssmlm/data/builtin/README.md (the sha256 that data=indic_chars's recipe expects)."""
    import yaml

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/data/indic_chars.yaml").read_text())
    recipe = next(s for s in conf["sources"] if "recipe" in s)
    assert {f"hindi/premchand/{k}": v for k, v in recipe["sha256"].items()} == builtin_corpus.checksums()


def test_builtin_copy_is_decompressed_once_and_repaired_when_damaged(tmp_path, monkeypatch):
    opened = []
    real_open = lzma.open
    monkeypatch.setattr(lzma, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    first = builtin_corpus.extract("hindi/premchand/valid.txt", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert builtin_corpus.extract("hindi/premchand/valid.txt", tmp_path) == first and len(opened) == 1
    assert first.stat().st_mtime_ns == stamp
    with open(first, "r+b") as f:  # damage one byte: the next use notices and decompresses again
        f.write(b"X")
    builtin_corpus.extract("hindi/premchand/valid.txt", tmp_path)
    assert len(opened) == 2 and sha(first.read_bytes()) == builtin_corpus.checksums()["hindi/premchand/valid.txt"]
    assert sorted(p.name for p in first.parent.iterdir()) == ["valid.txt"]  # no temporary files left


def test_damaged_package_copy_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin_corpus.checksums(), "hindi/premchand/test.txt", "f" * 64)
    with pytest.raises(DataError, match="damaged"):
        builtin_corpus.extract("hindi/premchand/test.txt", tmp_path)
    assert list((tmp_path / "builtin" / "hindi" / "premchand").iterdir()) == []


def test_unwritable_cache_dir_for_the_builtin_copy_is_one_clear_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="data.cache_dir"):
        resolve_files({"data.val_path": tmp_path / "valid.txt"}, [{"builtin": "hindi/premchand", "dir": str(tmp_path)}],
                      download=False, cache_dir=blocker, progress=False)


def test_users_own_files_win_over_the_builtin_copy(tmp_path):
    data_dir = tmp_path / "hindi" / "premchand"
    data_dir.mkdir(parents=True)
    (data_dir / "train.txt").write_text("मेरी अपनी कहानी\n", encoding="utf-8")
    found = resolve_files({"data.train_path": data_dir / "train.txt"},
                          [{"builtin": "hindi/premchand", "dir": str(data_dir)}], download=False,
                          cache_dir=tmp_path / "cache", progress=False)
    assert found == {"data.train_path": data_dir / "train.txt"} and not (tmp_path / "cache").exists()


def test_download_only_when_the_builtin_copy_is_missing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_corpus, "available", lambda corpus: False)  # a package built without it
    want = expected_splits()
    source = premchand_source(server, tmp_path, {name: sha(data) for name, data in want.items()})
    found = resolve_files({"data.train_path": tmp_path / "train.txt"},
                          [{"builtin": "hindi/premchand", "dir": str(tmp_path)}, source], download=True,
                          cache_dir=tmp_path / "cache", progress=False)
    assert found["data.train_path"].read_bytes() == want["train.txt"] and server.requests


# ---------------------------------------------------------------------------------------- Premchand recipe
STORIES = {f"story-{i:03d}.txt": f"  \r\nकहानी {i}: पहली पंक्ति।\r\n\r\nदूसरा अनुच्छेद {i}।\n\n  " for i in range(23)}


def expected_splits() -> dict[str, bytes]:
    """The split rule of ssmlm/data/builtin/README.md, written out independently of the code under test."""
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
    resolve_files(paths, [source], download=True, progress=False)
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
    """The first 99 story files of the real repository (in listing order) land where ssmlm/data/builtin/README.md says."""
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
