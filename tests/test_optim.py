"""AdamW's groups: weight decay on matrices only; checkpoints of either grouping resume by parameter name."""
import pytest
import torch

from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.llama import Llama
from staged_fast.model import GPT
from staged_fast.optim import decay_groups, names_in_optimizer_order, state_in_layout
from train_utils import train


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matrices_decay_and_biases_and_norm_gains_do_not(family):
    if family == "gpt2":
        model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    else:
        model = Llama(GPTConfig(arch="llama", n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=64,
                                n_positions=16, intermediate_size=48))
    decay, no_decay = decay_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in decay["params"]]
    kept = [names[id(p)] for p in no_decay["params"]]
    assert sorted(decayed + kept) == sorted(names.values())  # each parameter once (the tied head too)
    assert all(dict(model.named_parameters())[n].ndim == 2 for n in decayed)
    assert all(dict(model.named_parameters())[n].ndim == 1 for n in kept) and kept
    assert any("ln" in n or "norm" in n for n in kept)
    assert any("wte" in n or "embed" in n for n in decayed)
    if family == "gpt2":
        assert any(n.endswith(".bias") for n in kept)


def test_a_step_decays_the_matrices_and_leaves_the_vectors():
    """With zero gradients, AdamW moves a parameter by its decay alone: matrices shrink by (1 - lr*wd),
    biases and gains stay as they are."""
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # no zeros, and gains away from 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(decay_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.1 * 0.5) if p.ndim == 2 else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)


def test_state_in_layout_moves_a_one_group_state_by_name():
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    old = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, betas=(0.8, 0.9))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved, saved_names = old.state_dict(), [n for n, _ in model.named_parameters()]
    new = torch.optim.AdamW(decay_groups(model, 0.1), lr=0.1, betas=(0.85, 0.95), eps=1e-7, amsgrad=False)
    new.load_state_dict(state_in_layout(new, model, saved, saved_names))
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]  # the command's (COMMAND_DECIDES)
    assert all(g["betas"] == (0.85, 0.95) and g["eps"] == 1e-7 for g in new.param_groups)
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    with pytest.raises(ValueError, match="other parameters"):
        state_in_layout(new, model, saved, saved_names[:-1] + ["not.a.parameter"])


def test_a_checkpoint_whose_adamw_decayed_every_parameter_resumes_by_name(tmp_path, data_cache, monkeypatch,
                                                                           capsys):
    """Checkpoints written before the groups hold one group (every parameter decayed, in model order). The
    same command resumes them: each parameter gets its own moments back, the vectors stop decaying, and the
    log says so."""
    from staged_fast import trainer as trainer_module

    flags = ["--train_steps", "4", "--weight_decay", "0.1"]
    with monkeypatch.context() as m:  # the old layout: one group over model.parameters()
        m.setattr(trainer_module, "decay_groups", lambda model, wd: [{"params": list(model.parameters()),
                                                                       "weight_decay": wd}])
        assert train(tmp_path / "run", data_cache, *flags, "--stop_at_step", "2") == 0
    (old,) = list_checkpoints(tmp_path / "run")
    saved = load_checkpoint(old)
    assert len(saved.optimizer_state["param_groups"]) == 1
    capsys.readouterr()
    assert train(tmp_path / "run", data_cache, *flags, "--resume", "latest") == 0
    assert "had one parameter group (every parameter decayed); from here on biases and norm gains are not decayed" \
        in capsys.readouterr().out
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    groups = final.optimizer_state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = final.param_names
    for g in groups:
        dims = {final.model_state[names[i]].ndim for i in g["params"]}
        assert dims == ({2} if g["weight_decay"] else {1}), dims
    assert sorted(names) == sorted(saved.param_names)
    assert final.optimizer_state["state"][names.index(names[0])]["step"].item() == 4


def test_adamw_flags_changed_on_a_resume_apply_and_are_said(tmp_path, data_cache, capsys):
    """--adam_beta2 / --adam_eps on a resume were recorded in the run's args but AdamW went on with the
    checkpoint's; the command's values now apply, with a note."""
    run = tmp_path / "run"
    assert train(run, data_cache, "--train_steps", "4", "--stop_at_step", "2") == 0
    capsys.readouterr()
    assert train(run, data_cache, "--train_steps", "4", "--resume", "latest", "--adam_beta2", "0.95",
                 "--adam_eps", "1e-8") == 0
    assert "note: AdamW betas (0.9, 0.98) -> (0.9, 0.95), eps 1e-06 -> 1e-08 from this command" in capsys.readouterr().out
    final = load_checkpoint(list_checkpoints(run)[-1])
    assert all(tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-8 for g in final.optimizer_state["param_groups"])
    assert final.trainer_state["args"]["adam_beta2"] == 0.95


def test_names_follow_the_optimizer_order():
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    opt = torch.optim.AdamW(decay_groups(model, 0.1))
    names = names_in_optimizer_order(model, opt)
    ids = opt.state_dict()["param_groups"]
    named = dict(model.named_parameters())
    assert [named[names[i]].ndim for i in ids[0]["params"]] == [2] * len(ids[0]["params"])
    assert [named[names[i]].ndim for i in ids[1]["params"]] == [1] * len(ids[1]["params"])


def test_a_one_group_sharded_checkpoint_resumes_under_fsdp(tmp_path, data_cache):
    """The same for a sharded (DCP) checkpoint, which torch.distributed.checkpoint maps by name: a one-rank fsdp
    run writes it with the old single group (patched in a subprocess), the plain command resumes it."""
    import os
    import subprocess
    import sys

    args = ["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "4", "--warmup_steps", "1",
            "--val_every", "1000", "--no_progress", "--device", "cpu", "--parallel", "fsdp", "--weight_decay", "0.1",
            "--cache_dir", data_cache, "--save_prefix", str(tmp_path / "run")]
    old_layout = ("import sys, staged_fast.trainer as t; "
                  "t.decay_groups = lambda model, wd: [{'params': list(model.parameters()), 'weight_decay': wd}]; "
                  "from staged_fast.train import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run([sys.executable, "-c", old_layout, *args, "--stop_at_step", "2"], env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    (old,) = list_checkpoints(tmp_path / "run")
    assert len(load_checkpoint(old).optimizer_state["param_groups"]) == 1
    resumed = subprocess.run([sys.executable, "-m", "staged_fast.train", *args, "--resume", "latest"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "had one parameter group" in resumed.stdout
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert final.sharded and final.trainer_state["iteration"] == 4
    groups = final.optimizer_state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    for g in groups:
        dims = {final.model_state[final.param_names[i]].ndim for i in g["params"]}
        assert dims == ({2} if g["weight_decay"] else {1}), dims
    assert all(s["step"].item() == 4 for s in final.optimizer_state["state"].values())
