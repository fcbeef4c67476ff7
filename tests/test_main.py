"""lcssl.main's own choices (the rest of it runs in tests/test_e2e.py)."""
from lcssl import main


def test_compilation_cache_defaults_to_the_users_cache_and_the_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main.compilation_cache_dir("~/.cache/lcssl/jax", {}) == str(tmp_path / ".cache/lcssl/jax")
    assert main.compilation_cache_dir("", {}) is None
    assert main.compilation_cache_dir("~/x", {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}) is None
    assert main.compilation_cache_dir("rel/dir", {}).endswith("/rel/dir")
