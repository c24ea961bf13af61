"""The fused CPU attention kernel's build, fallbacks and batching (its numbers against
jax.nn.dot_product_attention are in test_attention.py, beside the other implementations)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax.model.attention import attention
from fwi_jax.model.fused_attention import KernelBuildError, library_path, load_kernel

# as test_attention.py: float32 reordering, and the kernel's exp (< 2e-6 relative)
ATOL = RTOL = 2e-5


def fused(q, k, v, block):
    return attention(q, k, v, impl="fused_cpu", block_size=block)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        timeout=300,
    )


def test_kernel_is_cached_per_machine():
    path = load_kernel()
    assert path == library_path() and path.exists()
    assert path.parent.name == "kernels" and path.suffix == ".so"


def test_vmap_over_members_matches_each_member():
    """An ensemble vmaps members of one config: one kernel call over members x batch."""
    q, k, v = (
        jax.random.normal(key, (3, 2, 97, 2, 16)) for key in jax.random.split(jax.random.key(0), 3)
    )
    batched = jax.jit(jax.vmap(lambda q, k, v: fused(q, k, v, 32)))(q, k, v)
    for m in range(3):
        ref = jax.nn.dot_product_attention(q[m], k[m], v[m], implementation="xla")
        np.testing.assert_allclose(batched[m], ref, atol=ATOL, rtol=RTOL)
    # gradients through vmap (the backward kernel batched the same way), one operand unbatched
    loss = lambda q, k, v: jnp.sum(fused(q, k, v, 32) ** 2)
    ref_loss = lambda q, k, v: jnp.sum(
        jax.nn.dot_product_attention(q, k, v, implementation="xla") ** 2
    )
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, 0, None)))(q, k, v[0])
    ref_grads = jax.vmap(jax.grad(ref_loss, argnums=(0, 1, 2)), in_axes=(0, 0, None))(q, k, v[0])
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=ATOL)
    hlo = jax.jit(jax.vmap(lambda q, k, v: fused(q, k, v, 32))).lower(q, k, v).as_text()
    # one call, members folded into the batch
    assert "stablehlo.while" not in hlo and "tensor<6x97x2x16xf32>" in hlo


def test_without_a_compiler_auto_says_it_uses_query_blocks(tmp_path):
    """No compiler: fused_cpu raises KernelBuildError naming the cause; auto runs query_blocks
    and says so on stderr (never silently)."""
    done = _run(
        """
        import jax.numpy as jnp
        from fwi_jax.model.attention import attention
        from fwi_jax.model.fused_attention import KernelBuildError, load_kernel
        try:
            load_kernel()
        except KernelBuildError as err:
            print("raised:", err)
        q = jnp.ones((1, 9, 1, 16))
        print("auto:", float(attention(q, q, 2 * q, impl="auto").mean()))
        """,
        CXX="/nonexistent/c++",
        PATH="/nonexistent",
        FWI_JAX_CACHE=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "raised: attention 'fused_cpu' builds its kernel with a C++ compiler" in done.stdout
    assert "auto: 2.0" in done.stdout
    assert (
        "model.attention=auto -> query_blocks for cpu: slower, because the fused_cpu kernel"
        in done.stderr
    )
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").glob("*.so"))


def test_a_missing_cxx_is_an_error_not_a_fallback(tmp_path):
    """$CXX names a compiler that is not there: an error naming it, even with g++ on PATH."""
    done = _run(
        """
        from fwi_jax.model.fused_attention import KernelBuildError, load_kernel
        try:
            load_kernel()
        except KernelBuildError as err:
            print("raised:", err)
        """,
        CXX="/nonexistent/c++",
        FWI_JAX_CACHE=str(tmp_path),
    )
    assert (
        "raised:" in done.stdout and "$CXX='/nonexistent/c++' is not an executable" in done.stdout
    ), done.stdout


def test_a_failed_build_names_the_compiler_error(tmp_path):
    """A compiler that fails: the error carries the command and the compiler's own message."""
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = _run(
        """
        from fwi_jax.model.fused_attention import KernelBuildError, load_kernel
        try:
            load_kernel()
        except KernelBuildError as err:
            print("raised:", err)
        """,
        CXX=str(fake),
        FWI_JAX_CACHE=str(tmp_path),
    )
    assert "raised: building" in done.stdout and "fake compiler: no" in done.stdout, (
        done.stdout + done.stderr
    )


@pytest.mark.full
def test_avx2_build_matches_the_reference(tmp_path):
    """The kernel built for AVX2 (8-float vectors, 2 a micro-tile row: what a CPU without
    AVX-512 runs) agrees with jax's attention in forward and gradients. N = 300: two key chunks
    in the backward; scores rising by ~11 over each row, so that the forward raises its lazy
    row maximum (AnyGreater's portable branch) and rescales."""
    done = _run(
        """
        import jax, jax.numpy as jnp, numpy as np
        from fwi_jax.model.attention import attention
        from fwi_jax.model.fused_attention import load_kernel
        print(load_kernel())
        keys = jax.random.split(jax.random.key(1), 4)
        q, k, v, w = (jax.random.normal(key, (2, 300, 2, 48)) for key in keys)
        q, k = q.at[..., 0].set(2.0), k.at[..., 0].set(jnp.linspace(0.0, 40.0, 300)[None, :, None])
        ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
        ours = lambda q, k, v: attention(q, k, v, impl="fused_cpu", block_size=40)
        np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=2e-5, rtol=2e-5)
        g = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
        r = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, r):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
        print("ok")
        """,
        FWI_JAX_KERNEL_ARCH="haswell",
        FWI_JAX_CACHE=str(tmp_path),
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
    assert str(tmp_path) in done.stdout  # built afresh for this architecture


def test_errors_name_the_problem():
    q = jnp.zeros((1, 8, 1, 24))
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        attention(q, q, q, impl="fused_cpu")
    with pytest.raises(ValueError, match="block_size"):
        attention(
            jnp.zeros((1, 8, 1, 16)),
            jnp.zeros((1, 8, 1, 16)),
            jnp.zeros((1, 8, 1, 16)),
            impl="fused_cpu",
            block_size=0,
        )
    assert issubclass(KernelBuildError, RuntimeError)


def test_not_on_accelerators():
    """fused_cpu asked for in a program compiled for an accelerator fails, naming the platform
    (tests/test_gpu_lowering.py: a CUDA program that held the kernel anyway fails its check)."""
    q = jnp.zeros((1, 8, 1, 16))
    for platform in ("cuda", "tpu"):
        with pytest.raises(ValueError, match=f"CPU kernel; the program is compiled for {platform}"):
            attention(q, q, q, impl="fused_cpu", platform=platform)


def test_sharded_batch_runs_per_device_without_gathering():
    """Data parallelism over 4 CPU devices: each device's kernel takes its own batch shard (no
    all-gather of q, k, v), and the forward and gradients equal the single-device ones."""
    done = _run(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from fwi_jax.model.attention import attention
        keys = jax.random.split(jax.random.key(2), 3)
        q, k, v = (jax.random.normal(key, (8, 70, 2, 16)) for key in keys)
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl="fused_cpu", block_size=32) ** 2)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        single = step(q, k, v)
        shard = NamedSharding(jax.make_mesh((4,), ("data",)), P("data"))
        args = [jax.device_put(a, shard) for a in (q, k, v)]
        hlo = step.lower(*args).compile().as_text()
        assert "all-gather" not in hlo, "inputs gathered"
        assert "f32[2,70,2,16]" in hlo, "kernel not on per-device shards"
        for a, b in zip(jax.tree.leaves(step(*args)), jax.tree.leaves(single)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        print("ok")
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_kernel_flops_counts_what_xla_leaves_out():
    """XLA's cost analysis counts a custom call as 0 FLOPs; kernel_flops reads the kernel's calls
    from the compiled HLO: forward 2 and backward 5 matmuls of N x N x D per head."""
    from fwi_jax.model.fused_attention import kernel_flops

    b, n, h, d = 2, 97, 3, 16
    q = jnp.ones((b, n, h, d))
    compiled = jax.jit(jax.grad(lambda q: fused(q, q, q, 32).sum())).lower(q).compile()
    assert kernel_flops(compiled.as_text()) == 14 * b * h * n * n * d
    forward_only = jax.jit(lambda q: fused(q, q, q, 32)).lower(q).compile()
    assert kernel_flops(forward_only.as_text()) == 4 * b * h * n * n * d


@pytest.mark.full
def test_single_thread_bench_harness_builds_and_runs():
    """scripts/bench_fused_kernel.py includes the kernel's source and calls its per-head functions
    directly: it must keep compiling when their signatures change (a tiny shape, one block size;
    the harness prints one table row per block)."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench_fused_kernel.py")
    run = subprocess.run(
        [sys.executable, script, "--shape", "2", "70", "3", "16", "--blocks", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 1 and all(float(x) > 0 for x in rows[0].strip("| \n").split("|")[1:]), (
        run.stdout
    )


def test_default_blocks_differ_per_pass():
    """block_size None: the forward runs 64-row query blocks, the backward 256 (each pass's
    measured best, docs/performance.md §1a); an explicit block_size sets both."""
    import re

    from fwi_jax.model.attention import DEFAULT_BLOCKS, FUSED_CPU_BACKWARD_BLOCK

    q = jnp.ones((1, 97, 2, 16))

    def blocks(block_size):
        grad = jax.grad(lambda q: attention(q, q, q, impl="fused_cpu", block_size=block_size).sum())
        text = jax.jit(grad).lower(q).as_text()
        return {
            name: int(b) for name, b in re.findall(r"@fwi_attention_(\w+)\(.*?block = (\d+)", text)
        }

    assert blocks(None) == {
        "forward": DEFAULT_BLOCKS["fused_cpu"],
        "backward": FUSED_CPU_BACKWARD_BLOCK,
    }
    # else the first check proves nothing
    assert DEFAULT_BLOCKS["fused_cpu"] != FUSED_CPU_BACKWARD_BLOCK
    assert blocks(40) == {"forward": 40, "backward": 40}
