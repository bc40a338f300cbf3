import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
)

from tinyrl.checkpoint import (
    COMPLETE_MARKER,
    capture_rng,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_state,
    restore_rng,
    save_checkpoint,
)
from tinyrl.models import train_tokenizer

CORPUS = ["Using the numbers [3, 5, 7], create an equation that equals 22.", "<answer>3 * 5 + 7</answer>"] * 20


def tiny_config(vocab_size: int, **extra) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=True, **extra,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def actor(tokenizer):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_config(len(tokenizer))).eval()


@pytest.fixture
def critic(tokenizer):
    torch.manual_seed(1)
    return Qwen2ForTokenClassification(tiny_config(len(tokenizer), num_labels=1)).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def adamw_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_checkpoint_loads_with_from_pretrained_and_resumes_the_optimizer_exactly(tmp_path, tokenizer, actor, critic):
    ids = torch.tensor([tokenizer.encode(CORPUS[0])])
    optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-2)
    adamw_step(actor, optimizer, ids)
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": capture_rng(), "sampler": {"position": 8}}

    path = save_checkpoint(tmp_path, 1, {"actor": actor, "critic": critic}, tokenizer, state)

    assert path == tmp_path / "checkpoints" / "step_00000001"
    assert latest_checkpoint(tmp_path) == path and checkpoint_step(path) == 1
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "actor", "critic", "trainer_state.pt"]
    assert (path / "actor" / "model.safetensors").is_file() and (path / "critic" / "model.safetensors").is_file()
    assert json.loads((path / COMPLETE_MARKER).read_text()) == {"step": 1, "models": ["actor", "critic"]}

    loaded_actor = AutoModelForCausalLM.from_pretrained(path / "actor")
    loaded_critic = AutoModelForTokenClassification.from_pretrained(path / "critic")
    assert same_weights(loaded_actor, actor) and same_weights(loaded_critic, critic)
    loaded_tokenizer = AutoTokenizer.from_pretrained(path / "actor")  # the actor dir alone is a complete model
    text = "Using [3, 5, 7]\n<answer>3 * 5 + 7</answer>"
    assert loaded_tokenizer.decode(loaded_tokenizer.encode(text)) == text
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)

    # Continuing from the checkpoint takes exactly the step the original run takes next.
    restored = load_checkpoint_state(path)
    assert restored["step"] == 1 and restored["sampler"] == {"position": 8}
    resumed_optimizer = torch.optim.AdamW(loaded_actor.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(restored["optimizer"])
    adamw_step(actor, optimizer, ids)
    adamw_step(loaded_actor, resumed_optimizer, ids)
    assert same_weights(loaded_actor, actor)


def test_keeps_the_last_k_and_never_prunes_the_checkpoint_just_written(tmp_path, tokenizer, actor):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"actor": actor}, tokenizer, {"step": step}, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [30, 40]
    # A run resumed from an explicit older checkpoint writes step 25 while 30 and 40 exist.
    save_checkpoint(tmp_path, 25, {"actor": actor}, tokenizer, {"step": 25}, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [25, 40]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000025", "step_00000040"]


def test_saving_the_same_step_again_replaces_it(tmp_path, tokenizer, actor):
    save_checkpoint(tmp_path, 5, {"actor": actor}, tokenizer, {"step": 5, "note": "scheduled"})
    with torch.no_grad():
        actor.model.embed_tokens.weight.mul_(2)
    path = save_checkpoint(tmp_path, 5, {"actor": actor}, tokenizer, {"step": 5, "note": "on SIGTERM"})
    assert load_checkpoint_state(path)["note"] == "on SIGTERM"
    assert same_weights(AutoModelForCausalLM.from_pretrained(path / "actor"), actor)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]


CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from tinyrl.checkpoint import save_checkpoint

    run_dir, tokenizer_dir = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**{CONFIG})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    save_checkpoint(run_dir, 1, {"actor": model}, tokenizer, {"step": 1})
    print("saved 1", flush=True)

    class SlowToPickle:
        # torch.save pickles the trainer state after the weights are on disk: stall there, mid-write.
        def __reduce__(self):
            print("writing 2", flush=True)
            time.sleep(300)
            return (SlowToPickle, ())

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(run_dir, 2, {"actor": model}, tokenizer, {"step": 2, "stall": SlowToPickle()})
    print("saved 2", flush=True)
    """
)


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, tokenizer):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config = {k: v for k, v in tiny_config(len(tokenizer)).to_diff_dict().items() if k != "transformers_version"}
    script = CRASHING_WRITER.replace("{CONFIG}", repr(config))
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir), str(tokenizer_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "saved 1"
        assert child.stdout.readline().strip() == "writing 2"
        temps = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-step_00000002")]
        assert len(temps) == 1 and (temps[0] / "actor" / "model.safetensors").is_file()  # weights half-way in
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert temps[0].exists()  # the torn write is still on disk...
    previous = latest_checkpoint(run_dir)  # ...but never mistaken for a checkpoint
    assert previous == run_dir / "checkpoints" / "step_00000001"
    assert load_checkpoint_state(previous) == {"step": 1}
    torch.manual_seed(0)
    expected = Qwen2ForCausalLM(tiny_config(len(tokenizer)))
    assert same_weights(AutoModelForCausalLM.from_pretrained(previous / "actor"), expected)
    torn_weights = load_file(temps[0] / "actor" / "model.safetensors")
    assert torch.equal(torn_weights["model.norm.weight"], expected.model.norm.weight.detach() + 1.0)

    # The next save clears the dead writer's leftovers.
    save_checkpoint(run_dir, 2, {"actor": expected}, tokenizer, {"step": 2})
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


class InterruptWhilePickling:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_an_interrupted_save_removes_its_temporary_directory(tmp_path, tokenizer, actor):
    save_checkpoint(tmp_path, 1, {"actor": actor}, tokenizer, {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"actor": actor}, tokenizer, {"step": 2, "x": InterruptWhilePickling()})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_checkpoint_set_aside_for_a_resave_that_never_landed_is_recovered(tmp_path, tokenizer, actor):
    path = save_checkpoint(tmp_path, 7, {"actor": actor}, tokenizer, {"step": 7})
    # A crash between moving the old step-7 checkpoint aside and renaming the new one into place:
    os.replace(path, path.parent / f".tmp-step_00000007-{dead_pid()}-replaced")
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint_state(path) == {"step": 7}


def test_directories_without_the_marker_are_ignored_and_refused(tmp_path, tokenizer, actor):
    good = save_checkpoint(tmp_path, 3, {"actor": actor}, tokenizer, {"step": 3})
    unmarked = tmp_path / "checkpoints" / "step_00000009"
    unmarked.mkdir()
    (unmarked / "trainer_state.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="step_00000009 has no COMPLETE marker"):
        load_checkpoint_state(unmarked)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_state(tmp_path / "checkpoints" / "step_00000004")
    assert latest_checkpoint(tmp_path / "no-run-here") is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"step": -1}, ValueError, "step must be an int >= 0"),
        ({"keep_last": 0}, ValueError, "keep_last must be an int >= 1"),
        ({"models": {}}, ValueError, "models is empty"),
        ({"models": {"../actor": None}}, ValueError, "model name '../actor'"),
        ({"models": {"actor": object()}}, TypeError, r"models\['actor'\] \(object\) has no save_pretrained"),
        ({"state": [1, 2]}, TypeError, "state must be a dict"),
        ({"tokenizer_into": "policy", "two_models": True}, ValueError, "tokenizer_into='policy'"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, tokenizer, actor, critic, kwargs, error, message):
    args = {"step": 1, "models": {"actor": actor}, "tokenizer": tokenizer, "state": {}, "keep_last": 2}
    if kwargs.pop("two_models", False):
        args["models"] = {"actor": actor, "critic": critic}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        save_checkpoint(tmp_path, **args)
    assert not (tmp_path / "checkpoints").exists()


def draw_all() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 1000, (4,)).tolist())


def test_rng_capture_and_restore_reproduce_every_stream_across_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_all()
    torch.save({"rng": capture_rng()}, tmp_path / "state.pt")
    expected = [draw_all() for _ in range(3)]
    draw_all()  # move every stream on
    restore_rng(torch.load(tmp_path / "state.pt", weights_only=False)["rng"])
    assert [draw_all() for _ in range(3)] == expected
    with pytest.raises(KeyError, match="no 'numpy' entry"):
        restore_rng({"python": random.getstate(), "torch": torch.get_rng_state()})
