"""Merging real Hugging Face checkpoints (transformers as a test-only dependency): tiny GPT-2 and
BERT built from configs (nothing downloaded), saved with ``save_pretrained`` as sharded
safetensors, merged by ``meanwise merge``; the output loads with ``from_pretrained``, equals an
independent float64 average (read with the safetensors library), keeps tied weights tied, and
carries the target's config / tokenizer / generation config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from meanwise import cli

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def _gpt2(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _bert(seed: int, labels: int = 3):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=labels,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def _save(model, folder, shard="60KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    # tokenizer-like files: copied byte for byte by the merge
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (folder / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(VOCAB)))


def _read_all(folder):
    """Every tensor of a saved HF folder, through the safetensors library (not meanwise)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


def _merge(tmp_path, yaml_text, out="merged"):
    (tmp_path / "merge.yaml").write_text(yaml_text)
    assert cli.main(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / out)]) == 0
    return tmp_path / out


def test_gpt2_merge_loads_with_from_pretrained_tied_and_generates(tmp_path):
    inputs = []
    for i, seed in enumerate((0, 1)):
        _save(_gpt2(seed), tmp_path / f"m{i}")
        inputs.append(_read_all(tmp_path / f"m{i}"))
    assert "lm_head.weight" not in inputs[0]  # save_pretrained drops the tied copy
    out = _merge(
        tmp_path,
        "method: average\nmodels:\n  - {path: m0, weight: 3}\n  - {path: m1, weight: 1}\n"
        "out_shard_size: 50KB\n",
    )
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "vocab.txt",
            "model.safetensors.index.json"} <= names  # fmt: skip
    assert (out / "vocab.txt").read_bytes() == (tmp_path / "m0/vocab.txt").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    merged_files = _read_all(out)
    assert set(merged_files) == set(inputs[0])  # no duplicate lm_head.weight
    for key, target in inputs[0].items():
        expected = 0.75 * target.double() + 0.25 * inputs[1][key].double()
        torch.testing.assert_close(merged_files[key].double(), expected, rtol=0, atol=2e-7)

    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for key, value in model.state_dict().items():
        source = "transformer.wte.weight" if key == "lm_head.weight" else key
        if source in merged_files:
            assert torch.equal(value, merged_files[source]), key
    prompt = torch.tensor([[1, 2, 3]])
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)
    # the same greedy step by hand: argmax of the merged model's last logits
    with torch.no_grad():
        first = model(prompt).logits[0, -1].argmax()
    assert generated[0, 3] == first


def test_bert_merge_to_bfloat16_loads_and_keeps_the_target_head(tmp_path):
    _save(_bert(0, labels=3), tmp_path / "m0")
    _save(_bert(1, labels=5), tmp_path / "m1")  # another task: another head
    inputs = [_read_all(tmp_path / f"m{i}") for i in range(2)]
    out = _merge(
        tmp_path,
        "method: average\nmodels: [m0, m1]\ndtype: bfloat16\nkeep_target: [classifier]\n",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.classifier.weight.dtype == torch.bfloat16 and model.config.num_labels == 3
    state = model.state_dict()
    for key, target in inputs[0].items():
        if key.startswith("classifier."):
            expected = target
        elif target.is_floating_point():
            expected = (target.double() + inputs[1][key].double()) / 2
        else:
            expected = target
        got = state[key]
        if target.is_floating_point():
            # one rounding to bfloat16 of the float32 average: within half an ulp of bfloat16
            torch.testing.assert_close(got.double(), expected.to(torch.bfloat16).double(),
                                       rtol=2**-8, atol=1e-6)  # fmt: skip
        else:
            assert torch.equal(got, expected), key
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits.float()).all()


def test_no_files_are_copied_from_a_single_file_target(tmp_path):
    model = _gpt2(0)
    model.save_pretrained(tmp_path / "m0")
    model.save_pretrained(tmp_path / "m1")
    out = _merge(
        tmp_path,
        "method: average\nmodels: [m0/model.safetensors, m1/model.safetensors]\n",
    )
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
