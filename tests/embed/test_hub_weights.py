"""Hub weights availability asks huggingface_hub itself: cache, offline mode, proxies, errors."""

from __future__ import annotations

import socket
import threading
import time

import huggingface_hub
import huggingface_hub.constants as hf
import pytest
from huggingface_hub import errors as hf_errors
from safetensors.torch import save_file

from pipeline.embed.backbone import BackboneConfig, check_weights
from pipeline.embed.weights import ensure_hub_weights_available
from pipeline.errors import InputError

REPO = "timm/test_resnet.r160_in1k"  # test_resnet's default pretrained tag


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def online(monkeypatch, empty_cache):
    """HF_HUB_OFFLINE off, no proxy exceptions, a fresh hub client (it reads proxies once)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    huggingface_hub.close_session()
    yield
    huggingface_hub.close_session()


def _use_proxy(monkeypatch, url: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.setenv("https_proxy", url)
    huggingface_hub.close_session()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_offline_and_not_cached_names_checkpoint(monkeypatch, empty_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    for check in (
        lambda: ensure_hub_weights_available("test_resnet"),
        lambda: check_weights(BackboneConfig("test_resnet", pretrained=True)),
    ):
        with pytest.raises(InputError, match=r"offline: HF_HUB_OFFLINE is set.*--checkpoint") as e:
            check()
        _one_line(e)
    assert time.perf_counter() - t0 < 3.0


def test_cached_pytorch_bin_counts_offline(monkeypatch, empty_cache):
    """A repo cached with only timm's fallback file (pytorch_model.bin) is available."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "pytorch_model.bin").write_bytes(b"cached")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    ensure_hub_weights_available("test_resnet")  # no error, no network


def _recording_connects(monkeypatch) -> list[tuple[object, object]]:
    """Every host/port this process resolves or connects to during the test."""
    seen: list[tuple[object, object]] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        seen.append((host, port))
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(self, address):
        seen.append(tuple(address[:2]))
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def test_a_dead_proxy_is_used_not_second_guessed(monkeypatch, online):
    """HTTPS_PROXY points at 127.0.0.1:9 (nothing listens): the hub client goes there — not
    straight to huggingface.co:443 — fails, and that failure is the one-line message."""
    seen = _recording_connects(monkeypatch)
    _use_proxy(monkeypatch, "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(
        InputError, match=r"cannot download pretrained weights for 'test_resnet'"
    ) as e:
        ensure_hub_weights_available("test_resnet")
    assert "cannot reach huggingface.co through proxy 127.0.0.1:9" in _one_line(e)
    assert time.perf_counter() - t0 < 5.0  # one request, no retries with backoff
    assert ("127.0.0.1", 9) in seen
    assert not [hp for hp in seen if hp[0] == "huggingface.co" or hp[1] == 443], seen


def test_the_proxy_gets_the_hub_request(monkeypatch, online):
    """A local proxy that refuses every tunnel sees ``CONNECT huggingface.co:443``."""
    server = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def serve() -> None:
        server.settimeout(10)
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            requests.append(data)
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        _use_proxy(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(InputError, match=r"cannot download pretrained weights") as e:
            ensure_hub_weights_available("test_resnet")
        _one_line(e)
    finally:
        thread.join(timeout=10)
        server.close()
    assert requests and requests[0].startswith(b"CONNECT huggingface.co:443 ")


def _hub_error(cls: type[Exception], message: str) -> Exception:
    """An instance of a huggingface_hub HTTP error without a real response."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (hf_errors.GatedRepoError, r"timm/test_resnet\.r160_in1k is a gated repository.*log in"),
        (hf_errors.RepositoryNotFoundError, r"is not a repository on huggingface\.co"),
        (hf_errors.RemoteEntryNotFoundError, r"has none of the weights files"),
        (hf_errors.OfflineModeIsEnabled, r"offline: HF_HUB_OFFLINE is set"),
    ],
)
def test_hub_errors_map_to_one_line(monkeypatch, online, error, needle):
    asked: list[str] = []

    def metadata(url, **kwargs):
        asked.append(url)
        raise _hub_error(error, f"{error.__name__} for {url}")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    with pytest.raises(InputError, match=needle) as e:
        ensure_hub_weights_available("test_resnet")
    assert "--checkpoint" in _one_line(e)
    assert asked and REPO in asked[0] and asked[0].endswith("model.safetensors")


def test_timms_fallback_file_is_tried_when_safetensors_is_missing(monkeypatch, online):
    asked: list[str] = []

    def metadata(url, **kwargs):
        asked.append(url.rsplit("/", 1)[-1])
        if url.endswith(".safetensors"):
            raise _hub_error(hf_errors.RemoteEntryNotFoundError, "404")
        return object()

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    ensure_hub_weights_available("test_resnet")
    assert asked == ["model.safetensors", "pytorch_model.bin"]


def test_cached_weights_need_no_request(monkeypatch, online, empty_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({}, repo / "snapshots" / commit / "model.safetensors")

    def metadata(url, **kwargs):
        raise AssertionError(f"asked the hub for {url}")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    ensure_hub_weights_available("test_resnet")
