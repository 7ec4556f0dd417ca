"""The code path of benchmarks/sampling_avenues.py at a tiny size (its timings are measured by the benchmark, never
asserted here): each rewritten sampler draws dppo_finetune.py's chains and old log-probs bit for bit."""

import pytest

from benchmarks import sampling_avenues as sa

EXACT = ("inference_mode", "sincache", "im_sincache", "coefs", "inplace", "inplace_im", "fused", "all")


def test_rewritten_samplers_match_rollout_action_bit_for_bit(capsys):
    out = sa.main(sa.Bench(num_envs=3, calls=1, rounds=2, threads=(1,), variants=(*EXACT, "addcmul")))
    assert {name for name, _ in out} == {"eager", *EXACT, "addcmul"}
    assert all(out[(name, 1)]["numbers"] == "bit-identical" for name in EXACT), out
    fma = out[("addcmul", 1)]["numbers"]  # a fused multiply-add rounds once: not the same numbers, but close
    assert fma == "bit-identical" or float(fma.split()[-1]) < 1e-5
    assert all(out[k]["cpu"] > 0 and out[k]["wall"] > 0 for k in out)
    assert "hopper: 3 envs, K = 20, K' = 10, T_a = 4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown variant"):
        sa.main(sa.Bench(variants=("eager", "fast")))
