"""The tiny local Qwen2 model, its tokenizer, and the policy/critic loaders, exercised through real files."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from tinyrl.models import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    IM_START,
    build_tiny_model,
    count_parameters,
    load_critic,
    load_policy,
    train_tokenizer,
)


def countdown_like_text(rng: random.Random) -> str:
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
    target = rng.randint(10, 200)
    a, b, c = numbers[:3]
    return (
        f"Using the numbers {numbers}, make {target}. Each number may be used once, with + - * / and brackets. "
        f"Think first, then give the equation.\nAssistant: <think>Try {a}+{b} = {a + b}, then times {c}."
        f"</think> <answer>({a}+{b})*{c}-1</answer>"
    )


MIXED_TEXTS = [
    "Hello world, this is a small corpus.\nIt has lines,\ttabs and  double spaces.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 3.14 -42 1e5",
    "Unicode: café naïve façade Ærø 日本語のテキスト Ελληνικά русский 🙂🚀",
    f"{IM_START}user\nWhat is 2+2?{IM_END}\n{IM_START}assistant\n4{IM_END}\n{END_OF_TEXT}",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    return [countdown_like_text(rng) for _ in range(300)] + MIXED_TEXTS * 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, corpus) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", corpus)


@pytest.fixture(scope="module")
def reloaded_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def memory_tokenizer(corpus):
    return train_tokenizer(corpus)


ROUND_TRIP_TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "many     spaces between",
    "digits 0123456789 and 12+34*5=182, 3.5e-2",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "\ttab\tseparated\t\tcolumns\t",
    "End.\nNext line!\n\nDone?\r\n  (indented) -> ok;\n",
    "café naïve Ærø 日本語 Ελληνικά עברית مرحبا 🙂👍🏽 ∑∫≤ 𝔘𝔫𝔦",
    f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nhi{IM_END}\n{END_OF_TEXT}",
    "it's THEY'LL we've I'M you'd, we'REady it'Sx 'dd",
    "",
    " ",
    "\n",
]


def assert_round_trip_and_same_split(text, reloaded, in_memory):
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text
    # The reload rebuilds Qwen2's own pipeline: our split pattern must cut text exactly where it does,
    # whatever merges the vocab happens to hold.
    pieces = reloaded.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert in_memory.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == pieces
    assert in_memory(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_reloaded_tokenizer_round_trips_text_exactly(text, reloaded_tokenizer, memory_tokenizer):
    assert_round_trip_and_same_split(text, reloaded_tokenizer, memory_tokenizer)


# Characters that sit on the split pattern's edges, mixed with arbitrary unicode.
EDGE_CHARS = list("aZéß日 \t\n\r'sStTlLdDmMvVrReE19٣½.,!?*(<>|_-\u00a0\u2028\u3000")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.one_of(st.sampled_from(EDGE_CHARS), st.characters(codec="utf-8")), max_size=40))
def test_any_nfc_text_round_trips_and_splits_like_qwen2(text, reloaded_tokenizer, memory_tokenizer):
    text = unicodedata.normalize("NFC", text)
    assert_round_trip_and_same_split(text, reloaded_tokenizer, memory_tokenizer)


def test_special_tokens_have_fixed_ids_and_never_split(reloaded_tokenizer):
    tok = reloaded_tokenizer
    assert tok.convert_tokens_to_ids([END_OF_TEXT, IM_START, IM_END]) == [0, 1, 2]
    assert tok.eos_token == tok.pad_token == END_OF_TEXT
    assert tok.bos_token is None
    ids = tok(f"a{IM_START}b{IM_END}{END_OF_TEXT}", add_special_tokens=False)["input_ids"]
    assert ids[1] == 1 and ids[3:] == [2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # add_special_tokens adds nothing: prompts are exactly what the caller rendered.
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_digits_are_split_one_by_one(reloaded_tokenizer):
    tokens = reloaded_tokenizer.tokenize("2026 and 50")
    assert [t for t in tokens if t.isdigit()] == ["2", "0", "2", "6", "5", "0"]


def test_chat_template_renders_chatml(reloaded_tokenizer):
    messages = [
        {"role": "system", "content": "You solve puzzles."},
        {"role": "user", "content": "Make 24 from [4, 6, 1]."},
        {"role": "assistant", "content": "<answer>4*6*1</answer>"},
    ]
    rendered = reloaded_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        f"{IM_START}system\nYou solve puzzles.{IM_END}\n"
        f"{IM_START}user\nMake 24 from [4, 6, 1].{IM_END}\n"
        f"{IM_START}assistant\n<answer>4*6*1</answer>{IM_END}\n"
    )
    prompt = reloaded_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"Make 24 from [4, 6, 1].{IM_END}\n{IM_START}assistant\n")
    no_prompt = reloaded_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert prompt == no_prompt + f"{IM_START}assistant\n"
    ids = reloaded_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    assert reloaded_tokenizer.decode(ids) == prompt
    assert ids.count(1) == 3  # three <|im_start|>, each one token
    assert reloaded_tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_rejects_non_string_content(reloaded_tokenizer):
    with pytest.raises(Exception, match="content must be a string"):
        reloaded_tokenizer.apply_chat_template([{"role": "user", "content": 5}], tokenize=False)


def test_countdown_prompts_tokenise_compactly(reloaded_tokenizer):
    rng = random.Random(1)  # prompts the tokenizer has not seen
    held_out = [countdown_like_text(rng) for _ in range(50)]
    n_chars = sum(len(t) for t in held_out)
    n_tokens = sum(len(reloaded_tokenizer(t)["input_ids"]) for t in held_out)
    split = reloaded_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    n_pieces = sum(len(split(t)) for t in held_out)  # the fewest tokens any vocab could reach
    # Bytes alone give 1 token per character. Digits stay 1 token each by design, so ~0.38 is near the floor:
    # the learned merges turn almost every word and symbol run into a single token.
    assert n_tokens / n_chars < 0.42
    assert n_tokens <= 1.05 * n_pieces


def test_saved_files_are_a_standard_checkpoint(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [0, 2]  # <|endoftext|> and <|im_end|>
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny"]  # no staging directory left behind


def test_model_loads_every_saved_weight(tiny_dir):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = load_file(tiny_dir / "model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tiny_dir))


def test_default_model_is_tiny_and_untied(tiny_dir):
    model, _ = load_policy(tiny_dir)
    n_params = count_parameters(model)
    assert 100_000 < n_params < 1_000_000
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == n_params - model.model.embed_tokens.weight.numel()


def test_tied_embeddings_option(tmp_path, corpus):
    untied, _ = load_policy(build_tiny_model(tmp_path / "untied", corpus))
    tied, _ = load_policy(build_tiny_model(tmp_path / "tied", corpus, tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert count_parameters(untied) - count_parameters(tied) == untied.lm_head.weight.numel()


def test_trained_model_saves_and_reloads_with_identical_logits(tiny_dir, tmp_path):
    model, tokenizer = load_policy(tiny_dir)
    batch = tokenizer(["Using the numbers [12, 5, 3], make 50.", "<answer>(12+5)*3-1</answer>"],
                      return_tensors="pt", padding=True)
    # One real optimizer step, so the saved weights differ from anything a seed could regenerate.
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "step1")
    tokenizer.save_pretrained(tmp_path / "step1")

    reloaded, _ = load_policy(tmp_path / "step1")
    with torch.no_grad():
        after = reloaded(**batch).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_dir)(**batch).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, original)


def test_generation_with_left_padding(tiny_dir):
    model, tokenizer = load_policy(tiny_dir)
    assert tokenizer.padding_side == "left"
    prompts = ["Using the numbers [12, 5, 3], make 50.", "hi"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is padded on the left
    output = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert output.shape == (2, batch["input_ids"].shape[1] + 6)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    assert [t.startswith(p) for t, p in zip(texts, prompts)] == [True, True]
    # Padding must not change what the model sees: the short prompt's next-token logits match its unpadded run.
    with torch.no_grad():
        padded = model(**batch).logits[1, -1]
        alone = model(**tokenizer(prompts[1:], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_same_texts_and_seed_give_identical_model(tmp_path, corpus):
    first = build_tiny_model(tmp_path / "a", corpus, seed=3)
    second = build_tiny_model(tmp_path / "b", corpus, seed=3)
    other_seed = build_tiny_model(tmp_path / "c", corpus, seed=4)
    a, b, c = (load_file(d / "model.safetensors") for d in (first, second, other_seed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"] for d in (first, second, other_seed)]
    assert vocab[0] == vocab[1] == vocab[2]


def test_building_leaves_the_global_rng_alone(tmp_path, corpus):
    state = torch.random.get_rng_state()
    build_tiny_model(tmp_path / "m", corpus[:50])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_rebuilding_replaces_a_model_directory(tmp_path, corpus):
    target = build_tiny_model(tmp_path / "m", corpus, seed=0)
    old = load_file(target / "model.safetensors")["lm_head.weight"]
    build_tiny_model(target, corpus, seed=1)
    assert not torch.equal(load_file(target / "model.safetensors")["lm_head.weight"], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_critic_starts_from_the_policy_backbone_with_a_zero_head(tiny_dir):
    policy, tokenizer = load_policy(tiny_dir)
    critic = load_critic(tiny_dir)
    batch = tokenizer(["Using the numbers [1, 2]", "x"], return_tensors="pt", padding=True)
    critic.train()  # no dropout: a value model must be deterministic in training mode too
    values = critic(**batch).logits
    assert values.shape == (2, batch["input_ids"].shape[1], 1)
    assert torch.count_nonzero(values) == 0
    for name, param in policy.model.named_parameters():
        assert torch.equal(critic.model.get_parameter(name), param), name
    critic.score.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    assert torch.equal(critic(**batch).logits, critic(**batch).logits)


def test_critic_round_trips_through_save_pretrained(tiny_dir, tmp_path):
    critic = load_critic(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    batch = tokenizer(["<answer>(12+5)*3-1</answer>"], return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        critic.score.weight.normal_(generator=generator)
        critic.score.bias.fill_(0.25)
        critic.model.norm.weight.mul_(1.5)
        before = critic(**batch).logits
    critic.save_pretrained(tmp_path / "critic")

    reloaded = load_critic(tmp_path / "critic")
    saved, loaded = critic.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():  # the same weights; a fresh allocation may take another SIMD path (float rounding)
        torch.testing.assert_close(reloaded(**batch).logits, before, atol=1e-5, rtol=0)
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic")
    assert plain.config.num_labels == 1 and plain.dropout.p == 0.0


def test_critic_refuses_a_classifier_with_several_labels(tiny_dir, tmp_path):
    AutoModelForTokenClassification.from_pretrained(tiny_dir, num_labels=3).save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="3 labels"):
        load_critic(tmp_path / "clf")


def test_incomplete_checkpoints_are_refused_not_filled_with_random_weights(tiny_dir, tmp_path):
    critic_dir = tmp_path / "critic"
    load_critic(tiny_dir).save_pretrained(critic_dir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(critic_dir)
    with pytest.raises(ValueError, match=r"critic.*not a complete causal LM.*lm_head\.weight"):
        load_policy(critic_dir)

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, partial / name)
    weights = load_file(tiny_dir / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"partial.*model\.norm\.weight"):
        load_policy(partial)
    with pytest.raises(ValueError, match=r"partial.*critic needs.*model\.norm\.weight"):
        load_critic(partial)


def test_critic_from_a_tied_policy(tmp_path, corpus):
    tied_dir = build_tiny_model(tmp_path / "tied", corpus[:100], tie_word_embeddings=True)
    policy, _ = load_policy(tied_dir)
    critic = load_critic(tied_dir)
    assert torch.equal(critic.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert torch.count_nonzero(critic.score.weight) == 0


def test_load_errors_name_the_path(tmp_path, tiny_dir):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_policy(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_critic(missing)
    a_file = tmp_path / "weights.txt"
    a_file.write_text("not a model")
    with pytest.raises(NotADirectoryError, match="weights.txt"):
        load_policy(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no config.json"):
        load_policy(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no_weights.*no weights"):
        load_critic(no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match="no_tokenizer.*no tokenizer"):
        load_policy(no_tokenizer)
    load_critic(no_tokenizer)  # a critic needs no tokenizer
    with pytest.raises(TypeError, match="dtype"):
        load_policy(tiny_dir, dtype="float16")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hidden_size": 64, "num_heads": 4}, ValueError, r"head_dim.*hidden_size.*num_heads.*>= 32"),
        ({"hidden_size": 130, "num_heads": 4}, ValueError, r"hidden_size \(130\).*num_heads \(4\)"),
        ({"num_heads": 4, "num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\)"),
        ({"vocab_size": 200}, ValueError, r"vocab_size \(200\).*at least 259"),
        ({"num_layers": 0}, ValueError, r"num_layers must be a positive int"),
        ({"intermediate_size": 1.5}, ValueError, r"intermediate_size"),
    ],
)
def test_build_rejects_bad_arguments(tmp_path, corpus, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_tiny_model(tmp_path / "m", corpus, **kwargs)
    assert not (tmp_path / "m").exists()


def test_build_rejects_bad_texts_and_foreign_directories(tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        build_tiny_model(tmp_path / "m", ["fine", b"bytes"])
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("just one string")
    with pytest.raises(ValueError, match="texts is empty"):
        train_tokenizer([])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes"):
        build_tiny_model(foreign, ["some text"])
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_activation_checkpointing_keeps_the_gradients_and_warns_of_nothing(tiny_dir, recwarn):
    from tinyrl.models import enable_activation_checkpointing

    ids = torch.tensor([[5, 9, 11, 7, 3, 8]])
    grads = []
    for checkpointing in (False, True):
        model, _ = load_policy(tiny_dir)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]
