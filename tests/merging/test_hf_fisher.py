"""diagonal_fisher and `meanwise fisher` on Hugging Face models (transformers as a test-only
dependency; tiny models built from configs, nothing downloaded), against a float64 loop over
examples, token positions and classes that backpropagates each log-probability separately."""

import pytest
import torch

from meanwise import cli
from meanwise.merging import diagonal_fisher, load_state_dict, merge_checkpoints, save_safetensors

transformers = pytest.importorskip("transformers")

RTOL = 1e-6


def _bert(seed=0, vocab=100, labels=3):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=vocab, max_position_embeddings=16, num_labels=labels,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2(seed=0, vocab=50):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(vocab, n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, t - 2 :] = 0  # right padding on one example
    return {"input_ids": ids, "attention_mask": mask}


def oracle(model, batch, names, mode="exact", causal=False):
    """mean over examples (or non-padded positions) of Σ_terms w (∂ log p/∂θ)², one autograd call
    per example, position and class."""
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(params[k]) for k in names}
    units = 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for n in range(ids.shape[0]):
        logits = model(input_ids=ids[n : n + 1], attention_mask=mask[n : n + 1]).logits[0]
        positions = [None] if not causal else [t for t in range(ids.shape[1]) if mask[n, t]]
        for t in positions:
            log_p = torch.log_softmax(logits if t is None else logits[t], -1)
            p = log_p.exp().detach()
            if mode == "exact":
                terms = [(p[c], log_p[c]) for c in range(len(p))]
            elif t is None or t + 1 >= ids.shape[1] or not mask[n, t + 1]:
                continue  # no next token
            else:
                terms = [(1.0, log_p[ids[n, t + 1]])]
            units += 1
            for weight, objective in terms:
                grads = torch.autograd.grad(objective, [params[k] for k in names],
                                            retain_graph=True)  # fmt: skip
                for k, g in zip(names, grads, strict=True):
                    fisher[k] += weight * g.square()
    return {k: v / units for k, v in fisher.items()}


def assert_close(ours, expected):
    assert list(ours) == list(expected)
    # attention's key bias has a zero gradient (softmax is shift invariant): its Fisher is
    # rounding noise, so each tensor is compared relative to the largest Fisher entry of all
    overall = max(float(v.abs().max()) for v in expected.values())
    for key in expected:
        scale = max(float(expected[key].abs().max()), 1e-6 * overall)
        err = (ours[key] - expected[key]).abs().max() / scale
        assert err < RTOL, f"{key}: relative error {err:.2e}"
    assert overall > 0


def test_bert_sequence_classification_matches_the_loop_and_the_checkpoint_names(tmp_path):
    model = _bert().double()
    batch = _batch(100, 3, 6)
    ours = diagonal_fisher(model, [batch], exclude=["classifier"], class_chunk_size=2)
    assert not any(k.startswith("classifier.") for k in ours)
    assert_close(ours, oracle(model, batch, list(ours)))
    model.save_pretrained(tmp_path / "bert")
    assert set(ours) <= set(load_state_dict(tmp_path / "bert"))
    # dict batches with labels: the empirical Fisher uses them
    labels = torch.tensor([0, 2, 1])
    empirical = diagonal_fisher(model, [dict(batch, labels=labels)], mode="empirical",
                                params=["bert.encoder.layer.1"])  # fmt: skip
    assert list(empirical) and all(k.startswith("bert.encoder.layer.1.") for k in empirical)
    reference = {k: torch.zeros_like(v) for k, v in empirical.items()}
    params = dict(model.named_parameters())
    for n in range(3):
        one = {k: v[n : n + 1] for k, v in batch.items()}
        log_p = torch.log_softmax(model(**one).logits[0], -1)
        grads = torch.autograd.grad(log_p[labels[n]], [params[k] for k in reference])
        for k, g in zip(reference, grads, strict=True):
            reference[k] += g.square() / 3
    assert_close(empirical, reference)


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_gpt2_causal_lm_per_token_with_tied_weights(mode):
    model = _gpt2().double()
    batch = _batch(50, 2, 5, seed=1)
    ours = diagonal_fisher(model, [batch], mode=mode, class_chunk_size=37)
    # the tied embedding / LM head is one parameter, under the name the checkpoint stores
    assert "transformer.wte.weight" in ours and "lm_head.weight" not in ours
    assert_close(ours, oracle(model, batch, list(ours), mode=mode, causal=True))
    # the chunk size changes the memory, not the numbers
    other = diagonal_fisher(model, [batch], mode=mode, class_chunk_size=500)
    for key in ours:
        torch.testing.assert_close(other[key], ours[key], rtol=1e-10, atol=0)


def test_errors_for_hf_batches():
    model = _bert()
    with pytest.raises(TypeError, match="batch 0.*dict batch"):
        diagonal_fisher(model, [{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="class_chunk_size"):
        diagonal_fisher(model, [_batch(100, 2, 4)], class_chunk_size=0)
    with pytest.raises(ValueError, match="task must be one of"):
        diagonal_fisher(model, [_batch(100, 2, 4)], task="seq2seq")
    with pytest.raises(ValueError, match="no parameters left"):
        diagonal_fisher(model, [_batch(100, 2, 4)], exclude=["*"])


def test_cli_fisher_from_a_model_dir_then_merge_with_the_head_kept(tmp_path, capsys):
    batch = _batch(100, 4, 6)
    save_safetensors(batch, tmp_path / "data.safetensors")
    for i in range(2):
        _bert(seed=i, labels=3 + i).save_pretrained(tmp_path / f"m{i}")
        code = cli.main([
            "fisher", "--model-dir", str(tmp_path / f"m{i}"), "--task", "sequence-classification",
            "--data", str(tmp_path / "data.safetensors"),
            "--out", str(tmp_path / f"f{i}.safetensors"),
            "--exclude", "classifier", "--class-chunk-size", "2", "--batch-size", "3",
        ])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    stored = load_state_dict(tmp_path / "f0.safetensors")
    expected = diagonal_fisher(_bert(seed=0), [batch], exclude=["classifier"])
    assert list(stored) == list(expected)
    for key in expected:
        torch.testing.assert_close(stored[key], expected[key], rtol=1e-5, atol=1e-12)
    merge_checkpoints(
        [tmp_path / "m0", tmp_path / "m1"],
        [tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"],
        tmp_path / "out",
        keep_target=["classifier"],
    )
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert merged.config.num_labels == 3
    # a wrong task (random weights would fill the LM head) and an unknown pattern: one line each
    common = [
        "fisher",
        "--model-dir",
        str(tmp_path / "m0"),
        "--data",
        str(tmp_path / "data.safetensors"),
        "--out",
        str(tmp_path / "x.safetensors"),
    ]
    for extra, code, message in [(["--task", "causal-lm"], 1, "is --task right"),
                                 (["--task", "sequence-classification", "--params", "nope"], 1,
                                  "nope"),
                                 ([], 2, "needs --task")]:  # fmt: skip
        capsys.readouterr()
        assert cli.main(common + extra) == code
        # (transformers' own "Loading weights" progress bar may precede it)
        lines = [x for x in capsys.readouterr().err.splitlines() if "meanwise" in x]
        assert len(lines) == 1 and message in lines[0], lines
        assert lines[0].startswith("meanwise: ")
    assert not (tmp_path / "x.safetensors").exists()
