"""Checkpoint cost: training stall, throughput against raw file I/O, resharding, host memory.

The reference LM with AdamW (params, first and second moments: three floats per parameter) on a
``data x fsdp`` mesh of simulated CPU devices (``reference_mesh_and_config``), saved and restored
with ``jaxlib_ext.checkpoint.Checkpointer`` in a temporary directory on the same disk as the
raw-I/O baseline. Every figure comes from one run; timed operations alternate round-robin
(the start rotating every round) and each figure is the median over rounds, ratios the median of
the per-round ratios.

1. Stall: in a train loop, the time until ``save()`` returns with ``async_save=True`` against
   ``save()`` + ``wait()`` with ``async_save=False``; the train step that runs (donating the state)
   while the asynchronous write is in flight, against a step alone; the asynchronous save alone
   (``save()`` + ``wait()``, nothing in between); and the Checkpointer's checksum pass alone (its
   ``jaxlib_ext.checkpoint.checksums.checksum_strings``, which ``save`` runs before handing the
   arrays to Orbax).
2. Throughput: logical state bytes over the synchronous save time and over the restore time (onto
   the saving mesh; with ``verify="full"`` and ``"none"``), against Orbax alone
   (``ocp.StandardCheckpointer`` of the same state) and the same arrays written as raw bytes
   (``np.asarray`` of each array, ``os.write`` into one file per array in the same directory,
   ``os.fsync``) and read back (``np.fromfile`` + ``jax.device_put`` onto the same shardings).
   Before every read, restores included, the files' pages are dropped from the page cache
   (``posix_fadvise DONTNEED``), so reads come from the disk.
3. Resharding: restore onto the saving mesh, onto ``fsdp`` over all devices, and onto one device
   (targets: ``jax.eval_shape`` of ``init_train_state`` with ``train_state_shardings`` on each
   mesh), plus the saving mesh with ``verify="none"``.
4. Host memory: each case in a fresh process (this script re-invoked with ``--child``): Checkpointer
   save, Orbax's own save, restore onto the saving mesh (verify full and none) and onto one device.
   Peak RSS is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs`` ``5``) and from a
   thread sampling ``VmRSS`` every 2 ms, minus the RSS just before the operation. On CPU the
   "device" arrays live in host memory: the baseline before a save includes the state (twice on
   ``data=2``, which replicates it), and a restore's growth includes the restored state (its
   resident size is reported). Each case runs twice per process; the first includes one-time
   costs (compiling the checksum, starting Orbax's threads). (``getrusage``'s ``ru_maxrss`` is of
   no use here: the child reported this script's own peak, inherited through fork and exec.)

Usage:

    python benchmarks/checkpoint.py [--devices 8] [--d-model 768] [--layers 8] [--repeats 5]
    python benchmarks/checkpoint.py --quick   # a tiny model, 2 rounds (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, reference_mesh_and_config, use_cpu_devices, write_json

RSS_TARGET = 2.0  # peak host RSS growth of a save or restore, in state sizes
CHILD_TAG = "CHECKPOINT_BENCH_CHILD "


# -- host memory --------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


class PeakRSS:
    """Peak RSS over a block: ``VmHWM`` after a reset and a 2 ms ``VmRSS`` sampler, both kept."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.sampled = 0
        self.hwm: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:  # resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
        except OSError:
            self._reset = False
        self.baseline = rss_bytes()
        self.sampled = self.baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, rss_bytes())
        self.hwm = _status_kib("VmHWM") * 1024 if self._reset else None

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm or 0)

    def row(self, state_bytes: int, seconds: float) -> dict:
        growth = self.peak - self.baseline
        return {
            "seconds": seconds,
            "baseline_rss_bytes": self.baseline,
            "peak_rss_bytes": self.peak,
            "peak_rss_sampled_bytes": self.sampled,
            "peak_rss_hwm_bytes": self.hwm,
            "growth_bytes": growth,
            "growth_over_state": growth / state_bytes,
        }


# -- the state ----------------------------------------------------------------------------------


def logical_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def resident_bytes(tree) -> int:
    """Bytes held by all devices together (replicated shards counted once per device)."""
    import jax

    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards)


def setup(args, *, constrain: bool = True):
    """``(mesh, lm, tx, shardings)`` of the reference LM with AdamW on the reference mesh."""
    import optax

    from jaxlib_ext import train
    from jaxlib_ext.model import LanguageModel
    from parallel.rules import activation_constraint

    mesh, cfg = reference_mesh_and_config(args)
    lm = LanguageModel(cfg, activation_sharding=activation_constraint(mesh) if constrain else None)
    tx = optax.adamw(1e-3)
    return mesh, lm, tx, train.train_state_shardings(lm, tx, mesh)


def build_state(lm, tx, shardings):
    """A fresh state with every float leaf moved by a small positive random amount, so that the
    moments are not zeros (which Orbax's zstd would shrink to nothing) and stay valid for Adam."""
    import jax
    import jax.numpy as jnp

    from jaxlib_ext import train

    def fill(state):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        out = [
            x + 1e-3 * jnp.abs(jax.random.normal(k, x.shape, x.dtype))
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
            for x, k in zip(leaves, keys, strict=True)
        ]
        return treedef.unflatten(out)

    state = train.init_train_state(lm, tx, shardings, seed=0)
    state = jax.jit(fill, out_shardings=shardings, donate_argnums=0)(state)
    return jax.block_until_ready(state)


def restore_target(lm, tx, mesh):
    """The restore target on ``mesh``: ShapeDtypeStructs with the library's shardings."""
    import jax

    from jaxlib_ext import train

    shardings = train.train_state_shardings(lm, tx, mesh)
    abstract = jax.eval_shape(lambda: train.init_train_state(lm, tx, shardings))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def restore_meshes(devices: int) -> dict[str, tuple[dict, int]]:
    """``name -> (axes, device count)``; the first is the saving mesh."""
    saving = {"data": 2, "fsdp": devices // 2} if devices % 2 == 0 else {"fsdp": devices}
    meshes = {"saving mesh " + "x".join(f"{k}{v}" for k, v in saving.items()): (saving, devices)}
    if devices > 1 and devices % 2 == 0:
        meshes[f"fsdp{devices}"] = ({"fsdp": devices}, devices)
    if devices > 1:
        meshes["1 device"] = ({"fsdp": 1}, 1)
    return meshes


def free(tree) -> None:
    import jax

    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.delete()


# -- files --------------------------------------------------------------------------------------


def drop_page_cache(path: Path) -> None:
    """Drops ``path``'s files (recursively) from the page cache; they stay on disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_write(state, directory: Path) -> tuple[float, float]:
    """Writes every leaf as raw bytes, one file each, fsynced. ``(total s, write+fsync s)``."""
    import jax
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    io = 0.0
    for i, x in enumerate(jax.tree.leaves(state)):
        host = np.ascontiguousarray(np.asarray(x))
        t = time.perf_counter()
        fd = os.open(directory / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(host).cast("B")
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        io += time.perf_counter() - t
    dir_fd = os.open(directory, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    return time.perf_counter() - start, io


def raw_read(target, directory: Path) -> tuple[float, float]:
    """Reads the raw files back onto ``target``'s shardings. ``(total s, read s)``."""
    import jax
    import numpy as np

    start = time.perf_counter()
    io = 0.0
    out = []
    for i, t in enumerate(jax.tree.leaves(target)):
        s = time.perf_counter()
        host = np.fromfile(directory / f"{i}.bin", dtype=t.dtype).reshape(t.shape)
        io += time.perf_counter() - s
        out.append(jax.device_put(host, t.sharding))
    jax.block_until_ready(out)
    total = time.perf_counter() - start
    free(out)
    return total, io


def checksum_pass():
    """The Checkpointer's checksum pass over a list of arrays, timed on its own to split the
    save stall."""
    from jaxlib_ext.checkpoint.checksums import checksum_strings

    return checksum_strings


# -- child processes: host memory ---------------------------------------------------------------

CHILD_CASES = ("save", "orbax-save", "restore", "restore-noverify")


def child(args) -> None:
    """One save or restore case in this fresh process, run twice; prints a JSON line."""
    use_cpu_devices(args.devices)
    import jax
    import orbax.checkpoint as ocp

    from jaxlib_ext.checkpoint import Checkpointer
    from parallel.mesh import make_mesh

    directory = Path(args.child_dir)
    mesh, lm, tx, shardings = setup(args, constrain=False)
    runs = []
    if args.child in ("save", "orbax-save"):
        state = build_state(lm, tx, shardings)
        size, resident = logical_bytes(state), resident_bytes(state)
        for run in (1, 2):
            if args.child == "save":
                saver = Checkpointer(directory, max_to_keep=1)
                save, wait = (lambda s, r=run: s.save(r, state)), (lambda s: s.wait())
            else:
                saver = ocp.StandardCheckpointer()
                save = lambda s, r=run: s.save(directory / str(r), state)
                wait = lambda s: s.wait_until_finished()
            with PeakRSS() as peak:
                start = time.perf_counter()
                save(saver)
                wait(saver)
                seconds = time.perf_counter() - start
            saver.close()
            runs.append(peak.row(size, seconds))
        target_mesh = mesh
    else:
        axes, count = restore_meshes(args.devices)[args.child_mesh]
        target_mesh = make_mesh(axes, devices=jax.devices()[:count])
        target = restore_target(lm, tx, target_mesh)
        size, resident = logical_bytes(target), None
        verify = "none" if args.child == "restore-noverify" else "full"
        with Checkpointer(directory, async_save=False, verify=verify) as ckpt:
            for _ in range(2):
                drop_page_cache(directory)
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    state, _ = ckpt.restore(target)
                    jax.block_until_ready(state)
                    seconds = time.perf_counter() - start
                resident = resident_bytes(state)
                runs.append(peak.row(size, seconds))
                free(state)
                state = None
    record = {
        "case": args.child,
        "mesh": {str(k): int(v) for k, v in target_mesh.shape.items()},
        "state_bytes": size,
        "resident_state_bytes": resident,
        "runs": runs,
    }
    print(CHILD_TAG + json.dumps(record), flush=True)


def run_child(args, case: str, directory: Path, mesh_name: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case]
    cmd += ["--child-dir", str(directory), "--devices", str(args.devices)]
    cmd += ["--d-model", str(args.d_model), "--layers", str(args.layers)]
    cmd += ["--seq-len", str(args.seq_len)]
    if mesh_name is not None:
        cmd += ["--child-mesh", mesh_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {case} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(CHILD_TAG) :])


# -- the main run -------------------------------------------------------------------------------


def med(xs) -> float:
    return statistics.median(xs)


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a / b`` (both timed in the same round)."""
    return med([x / y for x, y in zip(a, b, strict=True)])


def rotate(items: list, r: int) -> list:
    return items[r % len(items) :] + items[: r % len(items)]


def round_robin(ops: list, repeats: int, label: str, wall: float) -> None:
    for r in range(repeats):
        for op in rotate(ops, r):
            op()
        print(f"  {label} round {r + 1}/{repeats} ({time.perf_counter() - wall:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="rounds of every timed operation")
    p.add_argument("--dir", default=None, help="parent of the temporary directory (default /tmp)")
    p.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds (smoke test)")
    p.add_argument("--out", default="benchmarks/out/checkpoint.json")
    p.add_argument("--child", choices=CHILD_CASES, help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-mesh", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.d_model, args.layers, args.repeats = 128, 2, 2
    use_cpu_devices(args.devices)
    wall = time.perf_counter()

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxlib_ext import train
    from jaxlib_ext.checkpoint import Checkpointer, CheckpointError
    from parallel.mesh import make_mesh

    mesh, lm, tx, shardings = setup(args)
    state = build_state(lm, tx, shardings)
    size, resident = logical_bytes(state), resident_bytes(state)
    bsh = train.batch_sharding(mesh, global_batch=args.batch_size)
    step_fn = train.make_train_step(train.lm_loss(lm), tx, shardings, bsh)
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.seq_len + 1))
    batch = train.shard_batch(tokens.astype(np.int32), bsh)

    def step(state):
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        return state

    print(
        f"reference LM d_model {args.d_model}, {args.layers} layers: {lm.num_params() / 1e6:.1f}M "
        f"params; AdamW state {size / 2**20:.0f} MiB logical, {resident / 2**20:.0f} MiB "
        f"resident on mesh {dict(mesh.shape)}",
        flush=True,
    )
    for _ in range(2):
        state = step(state)
    checksums = checksum_pass()

    root = Path(tempfile.mkdtemp(prefix="checkpoint_bench_", dir=args.dir))
    try:
        # 1. the stall of a train loop's save --------------------------------------------------
        async_ckpt = Checkpointer(root / "async", max_to_keep=2, async_save=True)
        sync_ckpt = Checkpointer(root / "sync", max_to_keep=2, async_save=False)
        counter = {"async": 0, "sync": 0, "orbax": 0}
        keys = ["step", "async_stall", "async_step_during_write", "async_wait_after_step"]
        keys += ["async_save_to_committed_in_loop", "async_write_alone", "sync_save"]
        keys += ["checksum_pass"] if checksums else []
        times: dict[str, list[float]] = {k: [] for k in keys}

        def plain_step():
            nonlocal state
            t = time.perf_counter()
            state = step(state)
            times["step"].append(time.perf_counter() - t)

        def async_loop():  # save (the stall), the next step during the write, wait
            nonlocal state
            counter["async"] += 1
            t0 = time.perf_counter()
            async_ckpt.save(counter["async"], state)
            t1 = time.perf_counter()
            state = step(state)  # donates the state being written
            t2 = time.perf_counter()
            async_ckpt.wait()
            t3 = time.perf_counter()
            times["async_stall"].append(t1 - t0)
            times["async_step_during_write"].append(t2 - t1)
            times["async_wait_after_step"].append(t3 - t2)
            times["async_save_to_committed_in_loop"].append(t3 - t0)

        def async_alone():  # save + wait, nothing in between
            counter["async"] += 1
            t0 = time.perf_counter()
            async_ckpt.save(counter["async"], state)
            async_ckpt.wait()
            times["async_write_alone"].append(time.perf_counter() - t0)

        def sync_save():
            counter["sync"] += 1
            t0 = time.perf_counter()
            sync_ckpt.save(counter["sync"], state)
            sync_ckpt.wait()
            times["sync_save"].append(time.perf_counter() - t0)

        def checksum_op():
            t0 = time.perf_counter()
            checksums(jax.tree.leaves(state))
            times["checksum_pass"].append(time.perf_counter() - t0)

        print("warm-up saves ...", flush=True)
        t = time.perf_counter()
        async_alone()
        sync_save()
        first_saves = time.perf_counter() - t
        for v in times.values():
            v.clear()
        ops = [plain_step, async_loop, async_alone, sync_save]
        round_robin(ops + ([checksum_op] if checksums else []), args.repeats, "stall", wall)

        # the async checkpoint written while the next step donated its state must be intact
        try:
            restored, _ = async_ckpt.restore(
                restore_target(lm, tx, mesh), step=counter["async"] - 1
            )
            free(restored)
            async_ok: bool | str = True
        except CheckpointError as err:
            async_ok = f"{type(err).__name__}: {err}"
        async_ckpt.close()

        # 2 + 3. throughput against raw file I/O, restores onto other meshes --------------------
        meshes = restore_meshes(args.devices)
        same = next(iter(meshes))
        targets = {
            name: restore_target(lm, tx, make_mesh(axes, devices=jax.devices()[:count]))
            for name, (axes, count) in meshes.items()
        }
        rkeys = ["checkpoint_save", "orbax_save", "raw_write", "raw_write_io", "raw_read"]
        rkeys += ["raw_read_io", *(f"restore onto {n}" for n in meshes)]
        rkeys += [f"restore onto {same}, verify=none"]
        rtimes: dict[str, list[float]] = {k: [] for k in rkeys}
        orbax = ocp.StandardCheckpointer()

        def save_op():  # the same state under a new step; max_to_keep drops the oldest
            counter["sync"] += 1
            t = time.perf_counter()
            sync_ckpt.save(counter["sync"], state)
            sync_ckpt.wait()
            rtimes["checkpoint_save"].append(time.perf_counter() - t)

        def orbax_save_op():  # Orbax alone: StandardCheckpointer of the same state
            shutil.rmtree(root / "orbax", ignore_errors=True)
            counter["orbax"] += 1
            t = time.perf_counter()
            orbax.save(root / "orbax" / str(counter["orbax"]), state)
            orbax.wait_until_finished()
            rtimes["orbax_save"].append(time.perf_counter() - t)

        def raw_write_op():
            shutil.rmtree(root / "raw", ignore_errors=True)
            total, io = raw_write(state, root / "raw")
            rtimes["raw_write"].append(total)
            rtimes["raw_write_io"].append(io)

        def raw_read_op():
            drop_page_cache(root / "raw")
            total, io = raw_read(targets[same], root / "raw")
            rtimes["raw_read"].append(total)
            rtimes["raw_read_io"].append(io)

        def restore_op(name: str, verify: str):
            key = f"restore onto {name}" + ("" if verify == "full" else f", verify={verify}")

            def op():
                drop_page_cache(root / "sync")
                # a reader opened fresh: Orbax caches a manager's step list, so a second
                # Checkpointer opened before later saves would look for deleted steps
                ckpt = sync_ckpt if verify == "full" else Checkpointer(root / "sync", verify=verify)
                t = time.perf_counter()
                restored, _ = ckpt.restore(targets[name])  # the latest step
                jax.block_until_ready(restored)
                rtimes[key].append(time.perf_counter() - t)
                free(restored)
                if ckpt is not sync_ckpt:
                    ckpt.close()

            return op

        ops = [save_op, orbax_save_op, raw_write_op, raw_read_op]
        ops += [restore_op(n, "full") for n in meshes] + [restore_op(same, "none")]
        print("warm-up restores ...", flush=True)
        for op in ops:
            op()
        for v in rtimes.values():
            v.clear()
        round_robin(ops, args.repeats, "throughput/restore", wall)
        on_disk = disk_bytes(root / "sync" / str(counter["sync"]))
        orbax.close()
        shutil.rmtree(root / "raw", ignore_errors=True)
        shutil.rmtree(root / "orbax", ignore_errors=True)
        free(state)
        state = None
        gc.collect()

        # 4. host memory, each case in a fresh process -----------------------------------------
        print("host memory: child processes ...", flush=True)
        last = list(meshes)[-1]
        memory = {
            "Checkpointer save (async + wait)": run_child(args, "save", root / "child_save"),
            "Orbax StandardCheckpointer save": run_child(args, "orbax-save", root / "child_ox"),
            f"restore onto {same}": run_child(args, "restore", root / "sync", same),
            f"restore onto {same}, verify=none": run_child(
                args, "restore-noverify", root / "sync", same
            ),
        }
        if last != same:
            memory[f"restore onto {last}"] = run_child(args, "restore", root / "sync", last)
        sync_ckpt.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gbps = lambda seconds: size / seconds / 1e9
    restore_same = rtimes[f"restore onto {same}"]
    stall = {
        "step_seconds_median": med(times["step"]),
        "async_stall_seconds_median": med(times["async_stall"]),
        "sync_save_seconds_median": med(times["sync_save"]),
        "sync_over_async_stall": paired(times["sync_save"], times["async_stall"]),
        "checksum_pass_seconds_median": med(times["checksum_pass"]) if checksums else None,
        "async_write_alone_seconds_median": med(times["async_write_alone"]),
        "async_step_during_write_seconds_median": med(times["async_step_during_write"]),
        "async_step_during_write_over_step": paired(
            times["async_step_during_write"], times["step"]
        ),
        "async_wait_after_step_seconds_median": med(times["async_wait_after_step"]),
        "async_save_to_committed_in_loop_seconds_median": med(
            times["async_save_to_committed_in_loop"]
        ),
        "first_two_saves_seconds": first_saves,
        "seconds": times,
    }
    throughput = {
        "checkpoint_save_GBps": gbps(med(rtimes["checkpoint_save"])),
        "orbax_save_GBps": gbps(med(rtimes["orbax_save"])),
        "raw_write_GBps": gbps(med(rtimes["raw_write"])),
        "raw_write_io_only_GBps": gbps(med(rtimes["raw_write_io"])),
        "checkpoint_restore_GBps": gbps(med(restore_same)),
        "checkpoint_restore_noverify_GBps": gbps(med(rtimes[f"restore onto {same}, verify=none"])),
        "raw_read_GBps": gbps(med(rtimes["raw_read"])),
        "raw_read_io_only_GBps": gbps(med(rtimes["raw_read_io"])),
        "save_time_over_raw_write": paired(rtimes["checkpoint_save"], rtimes["raw_write"]),
        "orbax_save_time_over_raw_write": paired(rtimes["orbax_save"], rtimes["raw_write"]),
        "restore_time_over_raw_read": paired(restore_same, rtimes["raw_read"]),
        "restore_noverify_time_over_raw_read": paired(
            rtimes[f"restore onto {same}, verify=none"], rtimes["raw_read"]
        ),
    }
    restores = {
        k: {"seconds_median": med(v), "over_saving_mesh": paired(v, restore_same), "seconds": v}
        for k, v in rtimes.items()
        if k.startswith("restore")
    }

    ms = lambda s: f"{s * 1e3:8.0f} ms"
    print(f"\nstate: {size / 2**20:.0f} MiB logical, {on_disk / 2**20:.0f} MiB on disk per step")
    print("stall per save (medians over rounds)")
    rows = [
        ("train step alone", "step"),
        ("async save() until it returns (the stall)", "async_stall"),
        ("sync save() + wait()", "sync_save"),
        ("checksum pass alone", "checksum_pass"),
        ("async save() + wait(), nothing between", "async_write_alone"),
        ("train step during the async write", "async_step_during_write"),
    ]
    for label, key in rows:
        if stall[key + "_seconds_median"] is not None:
            print(f"  {label:<41} {ms(stall[key + '_seconds_median'])}")
    print(f"  {'sync / async stall':<41} {stall['sync_over_async_stall']:8.2f} x")
    print("throughput (logical state bytes / s; ratios: time / raw time, same round)")
    for key in ("checkpoint_save", "orbax_save", "raw_write", "raw_write_io_only"):
        print(f"  {key:<41} {throughput[key + '_GBps']:8.3f} GB/s")
    for key in (
        "checkpoint_restore",
        "checkpoint_restore_noverify",
        "raw_read",
        "raw_read_io_only",
    ):
        print(f"  {key:<41} {throughput[key + '_GBps']:8.3f} GB/s")
    for key in ("save_time_over_raw_write", "orbax_save_time_over_raw_write"):
        print(f"  {key:<41} {throughput[key]:8.2f} x")
    for key in ("restore_time_over_raw_read", "restore_noverify_time_over_raw_read"):
        print(f"  {key:<41} {throughput[key]:8.2f} x")
    print("restore (median s; ratio to the saving mesh's, same round)")
    for name, row in restores.items():
        print(f"  {name:<50} {row['seconds_median']:7.2f} s {row['over_saving_mesh']:6.2f} x")
    print("host RSS: peak minus the RSS before, over the logical state size (fresh process)")
    print(f"  {'case':<50} {'run 1':>6} {'run 2':>6}  state resident")
    for name, rec in memory.items():
        r1, r2 = (r["growth_over_state"] for r in rec["runs"])
        res = rec["resident_state_bytes"]
        res = f"{res / rec['state_bytes']:.2f}" if res is not None else "-"
        print(f"  {name:<50} {r1:6.2f} {r2:6.2f}  {res}")
    print(f"  (target: < {RSS_TARGET} state sizes)")
    record = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "model_params": lm.num_params(),
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
        "state_bytes": size,
        "resident_state_bytes": resident,
        "on_disk_bytes_per_step": on_disk,
        "stall": stall,
        "throughput": throughput,
        "restore": restores,
        "raw_and_save_seconds": {k: v for k, v in rtimes.items() if not k.startswith("restore")},
        "async_checkpoint_written_during_donating_step_restores": async_ok,
        "host_memory": memory,
        "rss_target_over_state": RSS_TARGET,
        "wall_seconds": time.perf_counter() - wall,
    }
    print("wrote", write_json(args.out, record))


if __name__ == "__main__":
    main()
