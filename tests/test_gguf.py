"""GGUF export: files from our converter load in llama.cpp and tokenize and decode like the HF model they came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from training.demo_model import ASSETS, CHATML_TEMPLATE
from training.errors import BackpropError
from training.gguf import QUANTIZATIONS, convert, verify


@pytest.fixture(scope="module")
def demo_f16(tiny_model_dir, tmp_path_factory) -> Path:
    return convert(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "demo-f16.gguf", "f16")


def field(reader: gguf.GGUFReader, key: str):
    value = reader.get_field(key)
    assert value is not None, f"{key} missing"
    return value.contents()


# --- the demo model (Llama architecture, byte-level BPE with ChatML) ------------------------------------------------------


@pytest.mark.slow
def test_f16_loads_in_llama_cpp_and_decodes_like_transformers(demo_f16, tiny_model_dir):
    report = verify(demo_f16, tiny_model_dir, "f16")
    assert report["ok"] and report["tokenizer_match"] and report["greedy_match"]
    assert report["max_logit_diff"] < 0.05  # a wrong rope permutation would be off by whole logits
    assert len(report["probe_tokens"]) == 8 and report["probe_tokens"] == report["expected_tokens"]
    assert report["llama_cpp_version"]


@pytest.mark.slow
def test_q8_0_is_written_directly_and_still_decodes_like_transformers(tiny_model_dir, tmp_path, demo_f16):
    path = convert(tiny_model_dir, tmp_path / "demo-q8_0.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay F32
    assert path.stat().st_size < 0.6 * demo_f16.stat().st_size
    report = verify(path, tiny_model_dir, "q8_0")
    assert report["ok"] and report["tokenizer_match"] and report["greedy_match"]
    assert report["max_logit_diff"] < 0.5


@pytest.mark.slow
def test_q4_k_m_is_quantized_by_llama_cpp_loads_and_generates(tiny_model_dir, tmp_path, demo_f16):
    path = convert(tiny_model_dir, tmp_path / "demo-q4_k_m.gguf", "q4_k_m")
    types = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types
    assert path.stat().st_size < 0.4 * demo_f16.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-q4_k_m.gguf"]  # no f16 or partial file left over
    report = verify(path, tiny_model_dir, "q4_k_m")
    assert report["ok"] and report["tokenizer_match"] and report["greedy_match"] is None
    assert len(report["probe_tokens"]) == 8


def test_metadata_holds_the_architecture_chat_template_and_special_tokens(demo_f16, tiny_model_dir):
    reader = gguf.GGUFReader(demo_f16)
    assert field(reader, "general.architecture") == "llama"
    expected = {"context_length": 1024, "embedding_length": 256, "block_count": 4, "feed_forward_length": 768,
                "attention.head_count": 8, "attention.head_count_kv": 4, "vocab_size": 1024}  # fmt: skip
    assert {key: field(reader, f"llama.{key}") for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == 10000.0
    assert field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"  # the demo tokenizer splits text with Qwen2's regex

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    ids = {token: i for i, token in enumerate(tokens)}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[ids[special]] == gguf.TokenType.CONTROL
    assert types[ids["ĠParis"]] == gguf.TokenType.NORMAL  # byte-level BPE: Ġ is the space
    # A chat model ends its turn with <|im_end|>: that is eos and eot, so llama.cpp and Ollama stop there.
    assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
    assert field(reader, "tokenizer.ggml.eot_token_id") == ids["<|im_end|>"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == ids["<|endoftext|>"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges[0].count(" ") == 1

    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.3.ffn_down.weight", "blk.0.attn_k.weight"} <= names
    assert len(names) == 3 + 4 * 9


# --- other architectures and tokenizers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A Qwen2 model with the demo tokenizer: q/k/v biases and tied embeddings, like Qwen2.5-0.5B."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # biases start at zero; random ones make a wrong conversion visible
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
        model.model.embed_tokens.weight.mul_(5.0)  # the tied head gives clear greedy choices, not near-ties
    target = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.mark.slow
def test_qwen2_with_biases_and_tied_embeddings_converts_and_decodes_like_transformers(tiny_qwen2_dir, tmp_path):
    from safetensors import safe_open

    with safe_open(tiny_qwen2_dir / "model.safetensors", framework="pt") as f:
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"} <= set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.v_proj.bias").abs().sum() > 0

    path = convert(tiny_qwen2_dir, tmp_path / "qwen2.gguf", "f16")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.attention.head_count_kv") == 2
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    report = verify(path, tiny_qwen2_dir, "f16")
    assert report["ok"] and report["tokenizer_match"] and report["greedy_match"]
    assert report["max_logit_diff"] < 0.05


@pytest.mark.slow
def test_llama3_rope_scaling_travels_as_the_rope_freqs_tensor(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, rope_scaling=rope, bos_token_id=None, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    model_dir = tmp_path / "tiny-llama3"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    path = convert(model_dir, tmp_path / "llama3.gguf", "f16")
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones slowed by `factor`
    report = verify(path, model_dir, "f16")  # without the factors the greedy tokens differ from transformers'
    assert report["ok"] and report["greedy_match"] and report["max_logit_diff"] < 0.05


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer.json: '▁' for spaces, BPE with <0xNN> byte fallback, <unk> <s> </s>, bos added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Like SentencePiece: prefix one '▁' and write spaces as '▁'; pieces never cross a word boundary.
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    learner = Tokenizer(models.BPE())
    learner.normalizer, learner.pre_tokenizer = normalizer, words
    corpus = (ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learned = json.loads(learner.to_str())["model"]

    # SentencePiece's layout: control tokens, the 256 byte tokens, then the learned pieces in merge order.
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer, tok.pre_tokenizer = normalizer, words
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.mark.slow
def test_mistral_with_a_sentencepiece_style_tokenizer_converts_and_decodes_like_transformers(tmp_path):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = sentencepiece_style_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, sliding_window=None, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)  # with this seed every greedy step wins by > 0.15 logits, far above f16's error (~0.01)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    model_dir = tmp_path / "tiny-mistral"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    path = convert(model_dir, tmp_path / "mistral.gguf", "f16")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[3 + 0x41] == gguf.TokenType.BYTE
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    report = verify(path, model_dir, "f16")
    assert report["ok"] and report["tokenizer_match"] and report["greedy_match"]
    assert report["max_logit_diff"] < 0.05 and len(set(report["probe_tokens"])) > 2


# --- errors ---------------------------------------------------------------------------------------------------------------


def test_an_unsupported_architecture_is_a_coded_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BackpropError) as caught:
        convert(tmp_path / "gpt2", tmp_path / "gpt2.gguf")
    assert caught.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE"
    assert caught.value.fields["architecture"] == "GPT2LMHeadModel"
    assert not (tmp_path / "gpt2.gguf").exists()


def test_an_unknown_quantization_is_a_coded_error_and_keeps_the_existing_file(tiny_model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"a good export from before")
    with pytest.raises(BackpropError) as caught:
        convert(tiny_model_dir, out, "q3_xs")
    assert caught.value.code == "INPUT_UNKNOWN_QUANTIZATION"
    assert caught.value.fields["quantization"] == "q3_xs"
    assert all(q in caught.value.fields["choices"] for q in QUANTIZATIONS)
    assert out.read_bytes() == b"a good export from before"


def test_a_failed_conversion_keeps_the_existing_file_and_leaves_nothing_behind(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "torn"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn copy
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    (out_dir / "model.gguf").write_bytes(b"a good export from before")
    with pytest.raises(BackpropError) as caught:
        convert(model_dir, out_dir / "model.gguf", "q4_k_m")
    assert caught.value.code == "INPUT_MODEL_INVALID"
    assert (out_dir / "model.gguf").read_bytes() == b"a good export from before"
    assert [p.name for p in out_dir.iterdir()] == ["model.gguf"]


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(BackpropError) as caught:
        convert(tmp_path, tmp_path / "x.gguf")
    assert caught.value.code == "INPUT_MODEL_NOT_FOUND"


def test_a_file_llama_cpp_cannot_load_fails_verification(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(BackpropError) as caught:
        verify(bad, tiny_model_dir, "f16")
    assert caught.value.code == "RUNTIME_GGUF_VERIFICATION_FAILED"
    assert "cannot load" in caught.value.fields["reason"]
