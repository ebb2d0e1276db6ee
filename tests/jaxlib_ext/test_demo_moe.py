"""The demo with MoE strategies (--moe-strategy ep|fsdp|fssdp), run as a user runs it."""

import json
import re
import shutil

import numpy as np
import pytest

from tests.jaxlib_ext.test_demo import TINY, _demo

pytestmark = pytest.mark.slow


MOE = ["--experts", "16", "--top-k", "2"]


def test_moe_strategies_report_balance_and_expert_bytes_and_resume(tmp_path):
    flags = [*TINY]
    flags[flags.index("--steps") + 1] = "6"
    records = {}
    for kind in ("ep", "fsdp", "fssdp"):
        extra = ["--slots", "8", "--reshard-every", "3"] if kind == "fssdp" else []
        out = tmp_path / kind
        done = _demo(*flags, *MOE, "--moe-strategy", kind, *extra, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "device load max/mean" in done.stdout and "expert bytes / step" in done.stdout
        assert "router aux loss (final)" in done.stdout
        records[kind] = json.loads((out / "metrics.json").read_text())
    for kind, record in records.items():
        # the objective adds the router's auxiliary loss; cross-entropy is reported on its own
        weight = record["model"]["router_aux_weight"]
        assert all(a > 0 for a in record["aux_loss"])
        np.testing.assert_allclose(
            record["losses"],
            np.add(record["cross_entropy"], np.multiply(weight, record["aux_loss"])),
            rtol=1e-6,
        )
        assert record["summary"]["final_loss"] == record["cross_entropy"][-1]
        assert len(record["moe_load_imbalance"]) == 6
        assert all(x >= 1.0 for x in record["moe_load_imbalance"])
        assert record["summary"]["moe"]["strategy"] == kind
    issued = {k: r["summary"]["moe"]["expert_bytes_issued_per_step"] for k, r in records.items()}
    # 2 layers x 16 experts x 2 x 64 x 256 x 4 B: fsdp gathers and scatters 7/8 of all of them,
    # fssdp c = 1 expert per device (7 received, 7 sent), ep none
    expert = 2 * 64 * 256 * 4
    assert issued == {"ep": 0.0, "fsdp": 2 * 2 * 16 * expert * 7 / 8, "fssdp": 2 * 2 * 7 * expert}
    # same data, same routing, no dropped token: the strategies train alike (fp32 round-off)
    np.testing.assert_allclose(records["fssdp"]["losses"], records["ep"]["losses"], rtol=1e-4)
    np.testing.assert_allclose(records["fsdp"]["losses"], records["ep"]["losses"], rtol=1e-4)


def test_moe_demo_resumes_exactly_after_a_resharding(tmp_path):
    """Saved at step 3 after the re-sharding at step 2, the resumed run continues bit-exactly
    (owner order, load windows and optimizer state all in the checkpoint)."""
    flags = [*TINY, *MOE, "--moe-strategy", "fssdp", "--reshard-every", "2"]
    flags[flags.index("--steps") + 1] = "6"
    ckpt = tmp_path / "ckpt"
    saving = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "3"]
    full = _demo(*flags, *saving, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    losses = json.loads((tmp_path / "full" / "metrics.json").read_text())["losses"]
    shutil.rmtree(ckpt / "6")  # as if the run had died after saving step 3
    again = _demo(*flags, *saving, "--resume", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    resumed = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert resumed["start_step"] == 3
    assert resumed["losses"] == losses


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--moe-strategy", "ep"], "--moe-strategy needs --experts"),
        ([*MOE, "--moe-strategy", "ep", "--slots", "2"], "slots"),
        ([*MOE, "--slots", "2"], "--slots, --remat and --reshard-every need --moe-strategy"),
        ([*MOE, "--moe-strategy", "fssdp", "--slots", "17"], "slots=17"),
        (["--experts", "12", "--moe-strategy", "ep"], "num_experts=12"),
        ([*MOE, "--moe-strategy", "ep", "--capacity-factor", "0"], "capacity_factor=0.0"),
        ([*MOE, "--moe-strategy", "ep", "--top-k", "17"], "top_k"),
        ([*MOE, "--moe-strategy", "ep", "--replicas", "2"], "cannot be combined"),
    ],
)
def test_bad_moe_flags_are_one_clear_error(tmp_path, flags, message):
    done = _demo(*flags, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
