"""convert/fetch.py against a loopback server: resume with a Range request after a cut, published
and recorded checksums, mirrors before URLs, one download for two processes, offline."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from convert.errors import UserError
from convert.fetch import MANIFEST, Remote, fetch, read_manifest
from tests.conftest import ROOT
from tests.http_server import LoopbackServer

DATA = bytes(range(256)) * 4096 + b"tail"      # 1 MiB + 4 bytes
MD5 = hashlib.md5(DATA).hexdigest()
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with LoopbackServer({"a.tar": DATA}) as s:
        yield s


def test_published_md5_verified_and_second_use_makes_no_request(server, tmp_path):
    remote = Remote("a.tar", (server.url("a.tar"),), md5=MD5, checksum_source="test")
    got = fetch(remote, tmp_path, progress=False)
    assert open(got.path, "rb").read() == DATA
    assert (got.sha256, got.checksum_kind, got.source) == (SHA, "published md5",
                                                            server.url("a.tar"))
    again = fetch(remote, tmp_path, progress=False)
    assert (again.source, again.checksum_kind) == ("cache", "published md5")
    assert len(server.requests_for("a.tar")) == 1
    assert sorted(os.listdir(tmp_path)) == [".fetch-manifest.json.lock", "a.tar", "a.tar.lock",
                                            MANIFEST]   # no .part left
    assert read_manifest(tmp_path)["a.tar"]["sha256"] == SHA   # for uses without the md5
    assert fetch(Remote("a.tar"), tmp_path, offline=True).checksum_kind == "recorded sha256"


def test_cut_download_resumes_with_a_range_request(server, tmp_path):
    server.cut["a.tar"] = 300_000
    got = fetch(Remote("a.tar", (server.url("a.tar"),), sha256=SHA), tmp_path, progress=False)
    assert open(got.path, "rb").read() == DATA
    first, retry = server.requests_for("a.tar")
    assert (first.range, first.status, first.sent) == ("", 200, 300_000)
    assert (retry.range, retry.status) == ("bytes=300000-", 206)
    assert retry.sent == len(DATA) - 300_000     # only the rest


def test_killed_download_resumes_at_the_next_run(server, tmp_path):
    """No retry left: the cut is one line, the part stays; the next run asks only the rest."""
    remote = Remote("a.tar", (server.url("a.tar"),), md5=MD5)
    server.cut["a.tar"] = 500_000
    with pytest.raises(UserError, match="cut after 500000 bytes"):
        fetch(remote, tmp_path, progress=False, retries=0)
    assert os.path.getsize(tmp_path / "a.tar.part") == 500_000
    assert not (tmp_path / "a.tar").exists()
    got = fetch(remote, tmp_path, progress=False)
    assert open(got.path, "rb").read() == DATA
    assert server.requests_for("a.tar")[-1].range == "bytes=500000-"
    assert server.requests_for("a.tar")[-1].sent == len(DATA) - 500_000


def test_a_server_that_ignores_the_range_restarts_the_part(server, tmp_path):
    (tmp_path / "a.tar.part").write_bytes(b"garbage that is not the file's head")
    server.files["a.tar"] = DATA
    # the loopback server honours ranges; a 200 to a range request is what this checks, so
    # a route answers the whole file whatever was asked
    def whole(handler, method):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(DATA)))
        handler.end_headers()
        handler.wfile.write(DATA)
        return True
    server.routes["/a.tar"] = whole
    got = fetch(Remote("a.tar", (server.url("a.tar"),), md5=MD5), tmp_path, progress=False)
    assert open(got.path, "rb").read() == DATA


def test_checksum_mismatch_is_one_line_and_removes_the_part(server, tmp_path):
    remote = Remote("a.tar", (server.url("a.tar"),), md5="0" * 32)
    with pytest.raises(UserError) as e:
        fetch(remote, tmp_path, progress=False)
    assert "md5 " + MD5 + " is not the published " + "0" * 32 in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a.tar.part").exists() and not (tmp_path / "a.tar").exists()


def test_404_then_a_working_mirror(server, tmp_path):
    server.status["/official/a.tar"] = 404
    server.status["/forbidden/a.tar"] = 403
    server.files["mirror/a.tar"] = DATA
    remote = Remote("a.tar", (server.url("official/a.tar"),), md5=MD5)
    got = fetch(remote, tmp_path, mirrors=(server.url("forbidden"), server.url("mirror")),
                progress=False)
    assert got.source == server.url("mirror/a.tar")
    assert [r.status for r in server.log] == [403, 200]   # mirrors before the official URL
    with pytest.raises(UserError) as e:
        fetch(remote, tmp_path / "other", mirrors=(server.url("forbidden"),), progress=False)
    assert "HTTP 403" in str(e.value) and "HTTP 404" in str(e.value)


def test_no_network_then_the_next_url(server, tmp_path):
    dead = "http://127.0.0.1:9/a.tar"      # the discard port: nothing listens
    got = fetch(Remote("a.tar", (dead, server.url("a.tar")), md5=MD5), tmp_path, progress=False)
    assert got.source == server.url("a.tar")
    with pytest.raises(UserError, match="no connection"):
        fetch(Remote("b.tar", (dead,), md5=MD5), tmp_path, progress=False)


def test_recorded_sha256_at_first_download_then_checked(server, tmp_path):
    remote = Remote("a.tar", (server.url("a.tar"),))
    first = fetch(remote, tmp_path, progress=False)
    assert first.checksum_kind == "recorded sha256 (first download)"
    assert read_manifest(tmp_path)["a.tar"]["sha256"] == SHA
    assert fetch(remote, tmp_path, progress=False).checksum_kind == "recorded sha256"
    with open(tmp_path / "a.tar", "r+b") as f:   # the file changes under the cache
        f.write(b"X")
    with pytest.raises(UserError, match="has changed since it was downloaded"):
        fetch(remote, tmp_path, progress=False)


def test_local_mirror_used_in_place_and_offline(server, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.tar").write_bytes(DATA)
    remote = Remote("a.tar", ("http://127.0.0.1:9/a.tar",), md5=MD5)
    got = fetch(remote, tmp_path / "cache", mirrors=(str(mirror),), offline=True,
                progress=False)
    assert got.path == str(mirror / "a.tar") and got.checksum_kind == "published md5"
    with pytest.raises(UserError) as e:
        fetch(remote, tmp_path / "cache", offline=True, progress=False)
    assert str(e.value) == (
        f"a.tar is not in {tmp_path / 'cache'} and no request is made offline: it would be "
        "fetched from http://127.0.0.1:9/a.tar; copy a.tar into a folder and give that folder "
        "as a mirror (MIRROR=<folder> / --mirror <folder>)")
    assert server.log == []


def test_recorded_checksum_travels_with_a_fetch_only_cache(server, tmp_path):
    """The cluster path: a cache filled on a login node is the mirror of a machine offline;
    the sha256 recorded there is the one checked."""
    remote = Remote("a.tar", (server.url("a.tar"),))
    fetch(remote, tmp_path / "login", progress=False)
    got = fetch(remote, tmp_path / "node", mirrors=(str(tmp_path / "login"),), offline=True,
                progress=False)
    assert got.checksum_kind == "recorded sha256"
    (tmp_path / "login" / "a.tar").write_bytes(DATA[:-1] + b"!")
    with pytest.raises(UserError, match="not the one recorded"):
        fetch(remote, tmp_path / "node2", mirrors=(str(tmp_path / "login"),), offline=True,
              progress=False)


def test_full_disk_is_refused_before_the_download(server, tmp_path, monkeypatch):
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(UserError, match="not enough free space for a.tar"):
        fetch(Remote("a.tar", (server.url("a.tar"),), md5=MD5), tmp_path, progress=False)
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()


def test_two_processes_download_once(tmp_path):
    with LoopbackServer({"a.tar": DATA}, delay=0.02) as server:
        code = ("import sys; from convert.fetch import Remote, fetch; "
                f"print(fetch(Remote('a.tar', ({server.url('a.tar')!r},), md5={MD5!r}), "
                "sys.argv[1], progress=False).source)")
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        sources = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert [p.returncode for p in procs] == [0, 0]
    assert sources == sorted(["cache", server.url("a.tar")])
    assert len(server.requests_for("a.tar")) == 1
    assert open(tmp_path / "a.tar", "rb").read() == DATA


def test_manifest_is_json_written_whole(server, tmp_path):
    fetch(Remote("a.tar", (server.url("a.tar"),)), tmp_path, progress=False)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    assert json.load(open(tmp_path / MANIFEST))["a.tar"]["size"] == len(DATA)
