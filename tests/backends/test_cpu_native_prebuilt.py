"""The prebuilt portable kernel library (``native.build_portable``): where there is no compiler (the CPU
container image) the loader takes it, but only the one of these very sources and only on a CPU with every
feature its target needs; otherwise it says why and the cpu backend keeps its torch path.

The library is built here with the real compiler into a temporary directory, then loaded with the compiler
hidden (an empty PATH, CC unset), as in the image.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from structlog.testing import capture_logs

from backends.cpu import native
from backends.cpu.backend import cpu_linear
from tests.backends.native_kernels import needs_cc, randn

pytestmark = needs_cc                                   # building the library needs one

CC = shutil.which("cc") or shutil.which("gcc")          # found before any test hides it


def clear() -> None:
    for cached in (native._compiled, native.decode_ops, native.decode_attention):
        cached.cache_clear()


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """The portable library of the current sources, in a directory of its own."""
    return native.build_portable(tmp_path_factory.mktemp("prebuilt"), compiler=CC)


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """The portable library of other sources: today's with a line added to decode_ops.c (an older version)."""
    src = tmp_path_factory.mktemp("src")
    edited = []
    for source in native._SOURCES:
        edited.append(src / source.name)
        edited[-1].write_text(source.read_text() + ("\n/* an older version */\n" if source.name == "decode_ops.c"
                                                    else ""))
    return native.build_portable(tmp_path_factory.mktemp("stale"), compiler=CC, sources=tuple(edited))


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler to be found, a cache directory of the test's own, and a fresh load (caches cleared
    before and after, so later tests get the normal native build again)."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("PAGEDGEN_CPU_KERNELS", raising=False)
    monkeypatch.delenv("PAGEDGEN_CPU_KERNELS_DIR", raising=False)
    monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    clear()
    assert native._compiler() is None
    yield monkeypatch
    monkeypatch.undo()
    clear()


def events(logs, name):
    return [e for e in logs if e["event"] == name]


def test_the_name_carries_the_sources_hash_and_the_target(prebuilt, tmp_path):
    march = native.PORTABLE_TARGETS[native._machine()][0]
    assert prebuilt.name == native.prebuilt_name() and prebuilt.name.endswith(f"-{march}.so")
    changed = []
    for source in native._SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        changed.append(copy)
    assert native.prebuilt_name(tuple(changed)) == prebuilt.name          # the text counts, not the path
    changed[1].write_text(changed[1].read_text() + "\n/* another line */\n")
    assert native.prebuilt_name(tuple(changed)) != prebuilt.name
    assert native.prebuilt_name(machine="vax") is None


def test_without_a_compiler_the_prebuilt_library_runs_the_kernels(prebuilt, no_compiler):
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(prebuilt.parent))
    with capture_logs() as logs:
        ops = native.decode_ops()
        kernel = native.decode_attention()
    assert ops is not None and kernel is not None
    [loaded] = events(logs, "cpu_kernel_prebuilt_loaded")
    assert loaded["path"] == str(prebuilt) and "no C compiler" in loaded["why"]
    assert not events(logs, "cpu_kernel_built") and not events(logs, "cpu_kernel_unavailable")
    for rows in (1, 3, 8):
        x, w, b = randn(rows, 576), randn(960, 576, seed=1), randn(960, seed=2)
        torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        assert torch.equal(cpu_linear(x, w), ops.linear(x, w))                  # the backend takes it
    # One decode step of attention over two requests' paged caches, against plain softmax attention.
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    assert kernel.supports(num_heads, num_kv_heads, head_dim, block_size)
    k_cache, v_cache = randn(6, block_size, num_kv_heads, head_dim, seed=3), randn(6, block_size, num_kv_heads,
                                                                                    head_dim, seed=4)
    tables, lens = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32), torch.tensor([20, 37], dtype=torch.int32)
    q, scale = randn(2, num_heads, head_dim, seed=5), head_dim ** -0.5
    out = kernel(q, k_cache, v_cache, tables, lens, scale)
    for i in range(2):
        n = int(lens[i])
        keys = k_cache[tables[i].long()].reshape(-1, num_kv_heads, head_dim)[:n]
        values = v_cache[tables[i].long()].reshape(-1, num_kv_heads, head_dim)[:n]
        group = num_heads // num_kv_heads
        scores = torch.einsum("hd,nhd->hn", q[i], keys.repeat_interleave(group, dim=1)) * scale
        ref = torch.einsum("hn,nhd->hd", scores.softmax(-1), values.repeat_interleave(group, dim=1))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_the_default_directory_is_the_cache_directorys_kernels(prebuilt, no_compiler, tmp_path):
    assert native.prebuilt_dir() == tmp_path / "cache" / "kernels"
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    shutil.copy(prebuilt, tmp_path / "cache" / "kernels")
    with capture_logs() as logs:
        assert native.decode_ops() is not None
    assert events(logs, "cpu_kernel_prebuilt_loaded")[0]["path"] == str(tmp_path / "cache" / "kernels" /
                                                                        prebuilt.name)


@pytest.mark.skipif(not native.PORTABLE_TARGETS.get(native._machine(), ("", ()))[1],
                    reason="this machine's portable target needs no CPU feature beyond the architecture")
@pytest.mark.parametrize("lacking", [("avx2", "fma"), ("movbe",), None])
def test_a_cpu_lacking_a_feature_of_the_target_is_refused(prebuilt, no_compiler, lacking):
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(prebuilt.parent))
    needed = native.PORTABLE_TARGETS[native._machine()][1]
    flags = None if lacking is None else (needed | {"ht", "avx512f"}) - set(lacking)     # None: unreadable
    no_compiler.setattr(native, "_cpu_flags", lambda: flags)
    with capture_logs() as logs:
        assert native.decode_ops() is None and native.decode_attention() is None
    [refused] = events(logs, "cpu_kernel_unavailable")
    assert not events(logs, "cpu_kernel_prebuilt_loaded")
    assert "this CPU lacks" in refused["reason"] and str(prebuilt) in refused["reason"]
    assert all(flag in refused["reason"] for flag in lacking or ["/proc/cpuinfo"])
    assert "torch" in refused["fallback"]
    x, w = randn(2, 64), randn(10, 64)
    torch.testing.assert_close(cpu_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)      # the torch path


def test_a_library_of_other_sources_is_not_loaded(prebuilt, stale, no_compiler):
    assert stale.name != prebuilt.name
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(stale.parent))
    with capture_logs() as logs:
        assert native.decode_ops() is None
    [refused] = events(logs, "cpu_kernel_unavailable")
    assert "no prebuilt library for these sources" in refused["reason"]
    assert str(stale.parent / prebuilt.name) in refused["reason"] and stale.name in refused["reason"]


def test_a_failing_compiler_falls_back_to_the_prebuilt_library(prebuilt, no_compiler, tmp_path):
    broken = tmp_path / "bin" / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    no_compiler.setenv("CC", str(broken))
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(prebuilt.parent))
    with capture_logs() as logs:
        assert native.decode_ops() is not None
    [loaded] = events(logs, "cpu_kernel_prebuilt_loaded")
    assert loaded["path"] == str(prebuilt) and "internal compiler error" in loaded["why"]


def test_switched_off_even_with_a_prebuilt_library(prebuilt, no_compiler):
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(prebuilt.parent))
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS", "0")
    assert native.decode_ops() is None and native.decode_attention() is None


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The baseline and the wide (AVX-512) portable libraries of the current sources, side by side."""
    if native._machine() not in native.WIDE_TARGETS:
        pytest.skip(f"no wide portable target for {native._machine()}")
    out = tmp_path_factory.mktemp("both")
    return native.build_portable(out, compiler=CC), native.build_portable(out, compiler=CC, wide=True)


def test_the_wide_library_is_taken_where_the_cpu_has_its_features(both, no_compiler):
    base, wide = both
    march = native.WIDE_TARGETS[native._machine()][0]
    assert wide.name == native.prebuilt_name(wide=True) != base.name and wide.name.endswith(f"-{march}.so")
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(wide.parent))
    flags = native._cpu_flags()
    runs_wide = flags is not None and not native.WIDE_TARGETS[native._machine()][1] - flags
    with capture_logs() as logs:
        ops = native.decode_ops()
    [loaded] = events(logs, "cpu_kernel_prebuilt_loaded")
    assert loaded["path"] == str(wide if runs_wide else base)
    x, w = randn(64, 576), randn(300, 576, seed=1)                      # the batched GEMM at the target's width
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_a_cpu_without_the_wide_features_takes_the_baseline_library(both, no_compiler):
    base, wide = both
    no_compiler.setenv("PAGEDGEN_CPU_KERNELS_DIR", str(wide.parent))
    no_compiler.setattr(native, "_cpu_flags", lambda: native.PORTABLE_TARGETS[native._machine()][1] | {"avx512f"})
    with capture_logs() as logs:
        assert native.decode_ops() is not None
    [loaded] = events(logs, "cpu_kernel_prebuilt_loaded")
    assert loaded["path"] == str(base) and loaded["target"] == native.PORTABLE_TARGETS[native._machine()][0]
    w = randn(300, 576, seed=1)
    for rows in (23, 24, 25, 63, 64):                 # the baseline's batched GEMM: whole and short last tiles
        x = randn(rows, 576)
        torch.testing.assert_close(native.decode_ops().linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_building_needs_a_compiler(no_compiler, tmp_path):
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build_portable(tmp_path / "out")
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build_portable(tmp_path / "out", wide=True)
