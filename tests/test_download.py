"""Download tests against a local http.server serving copies of the shared zips."""
import hashlib
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datasets import DataError, download_omniglot, load_omniglot
from datasets.omniglot import SPLITS, _list_split

ZIPS = [f"{s}.zip" for s in SPLITS]


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the folder; under /truncated/ it announces a whole file but sends half and hangs up."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if not self.path.startswith("/truncated/"):
            return super().do_GET()
        data = (Path(self.directory) / self.path.rsplit("/", 1)[1]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def served(tmp_path_factory, omniglot_root):
    """(base_url, md5s) of a local server holding copies of the two zips; other paths give 404."""
    www = tmp_path_factory.mktemp("www")
    for name in ZIPS:
        shutil.copy(omniglot_root / name, www / name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5s = {s: hashlib.md5((www / f"{s}.zip").read_bytes()).hexdigest() for s in SPLITS}
    yield f"http://127.0.0.1:{server.server_address[1]}", md5s
    server.shutdown()
    server.server_close()


def test_download(tmp_path, served, omniglot_root):
    url, md5s = served
    paths = download_omniglot(tmp_path, base_url=url, md5s=md5s, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ZIPS
    for s in SPLITS:
        assert paths[s] == tmp_path / f"{s}.zip"
        assert paths[s].read_bytes() == (omniglot_root / f"{s}.zip").read_bytes()
        assert len(_list_split(paths[s], s)) in (964, 659)  # readable, complete archive


def test_wrong_md5(tmp_path, served):
    url, md5s = served
    with pytest.raises(DataError, match="corrupted.*removed"):
        download_omniglot(tmp_path, base_url=url, md5s={s: "0" * 32 for s in SPLITS}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_not_found_says_what_to_do_instead(tmp_path, served):
    url, md5s = served
    with pytest.raises(DataError, match="404") as failure:
        download_omniglot(tmp_path, base_url=url + "/missing", md5s=md5s, progress=False)
    assert list(tmp_path.iterdir()) == []
    message = str(failure.value)
    assert "--data-root DIR" in message and "OMNIGLOT_ROOT=DIR" in message and 'make demo DATA="--data-root DIR"' in message
    assert "partial file" not in message  # nothing was written, so nothing was removed


def test_broken_transfer_removes_the_partial_file(tmp_path, served):
    url, md5s = served
    with pytest.raises(DataError, match="could not download") as failure:
        download_omniglot(tmp_path, base_url=url + "/truncated", md5s=md5s, progress=False)
    assert "the partial file was removed" in str(failure.value) and "--data-root" in str(failure.value)
    assert list(tmp_path.iterdir()) == []


def test_load_downloads_into_the_user_cache_from_env_url(tmp_path, served, monkeypatch):
    """Without a data root, load_omniglot downloads into the per-user cache; the served copies' MD5s
    are not the official ones, so the download is refused and nothing is left there."""
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("OMNIGLOT_BASE_URL", served[0])
    with pytest.raises(DataError, match="images_background.zip was corrupted"):
        load_omniglot(cache_dir=tmp_path / "cache")  # a new cache: no data root remembered there
    assert list((tmp_path / "higherANML" / "omniglot").iterdir()) == []


def test_a_remembered_root_that_is_gone_is_never_replaced_by_a_download(tmp_path, served, monkeypatch):
    """With a data root remembered and deleted since, a run that names none stops with the error naming
    it: it does not download a second copy elsewhere behind the user's back."""
    url = served[0]
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HIGHERANML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMNIGLOT_BASE_URL", url)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "omniglot_root.txt").write_text(f"{tmp_path / 'gone'}\n")
    with pytest.raises(DataError, match=rf"^the remembered data root {tmp_path / 'gone'} \(kept in "
                                        rf"{tmp_path / 'cache' / 'omniglot_root.txt'}\) does not exist"):
        load_omniglot(download=True)
    assert not (tmp_path / "xdg").exists()
