"""The tiny GGUF model: deterministic, structurally valid, loads and generates in llama.cpp."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import gguf
import pytest

from idp_pipelines.embedded.tiny_model import (
    BOS_ID,
    EOS_ID,
    TINY_MODEL_NAME,
    TINY_VOCAB_SIZE,
    UNK_ID,
    main,
    tiny_vocab,
    write_tiny_gguf,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", seed=0)


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, tiny_f32):
    again = write_tiny_gguf(tmp_path / "again.gguf", seed=0)
    assert _sha(again) == _sha(tiny_f32)
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert _sha(other) != _sha(tiny_f32)
    assert other.stat().st_size == tiny_f32.stat().st_size
    # no temp file left behind next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "other.gguf"]


def test_f16_is_deterministic_and_half_size(tmp_path, tiny_f32):
    a = write_tiny_gguf(tmp_path / "a.gguf", dtype="f16")
    b = write_tiny_gguf(tmp_path / "b.gguf", dtype="f16")
    assert _sha(a) == _sha(b)
    assert 0.45 < a.stat().st_size / tiny_f32.stat().st_size < 0.55


def test_structure_metadata_and_row_widths(tiny_f32):
    r = gguf.GGUFReader(tiny_f32)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    assert f["general.name"] == TINY_MODEL_NAME
    assert f["general.file_type"] == 0
    assert f["tokenizer.ggml.model"] == "llama"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (BOS_ID, EOS_ID, UNK_ID)
    assert "message['content']" in f["tokenizer.chat_template"]
    tokens = f["tokenizer.ggml.tokens"]
    types = f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(f["tokenizer.ggml.scores"]) == TINY_VOCAB_SIZE
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3 + 0x0A] == "<0x0A>"
    assert sum(t == int(gguf.TokenType.BYTE) for t in types) == 256
    assert "\u2581Hello" in tokens

    two_d = [t for t in r.tensors if len(t.shape) >= 2]
    assert len(r.tensors) == 2 + 2 * 9 + 1
    assert len(two_d) == 2 + 2 * 7
    for t in two_d:
        assert int(t.shape[0]) % 256 == 0, f"{t.name} ne0={t.shape[0]} is not a multiple of 256"
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    by_name = {t.name: t for t in r.tensors}
    assert [int(d) for d in by_name["token_embd.weight"].shape] == [256, TINY_VOCAB_SIZE]
    assert [int(d) for d in by_name["blk.0.attn_k.weight"].shape] == [256, 128]  # GQA: 2 kv heads of 64
    assert [int(d) for d in by_name["blk.1.ffn_down.weight"].shape] == [512, 256]
    norm = by_name["output_norm.weight"].data
    assert norm.min() == norm.max() == 1.0
    w = by_name["blk.0.attn_q.weight"].data
    assert 0.015 < float(w.std()) < 0.025
    assert 3 << 20 < tiny_f32.stat().st_size < 8 << 20


def test_vocab_layout():
    tokens, scores, types = tiny_vocab()
    assert len(tokens) == TINY_VOCAB_SIZE
    assert scores[:259] == [0.0] * 259
    normal = scores[259:]
    assert normal == sorted(normal, reverse=True)


def test_bad_arguments_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="dtype"):
        write_tiny_gguf(tmp_path / "x.gguf", dtype="q8_0")
    with pytest.raises(ValueError, match="n_head_kv"):
        write_tiny_gguf(tmp_path / "x.gguf", n_head=4, n_head_kv=3)
    assert not list(tmp_path.iterdir())
    out = tmp_path / "sub" / "cli.gguf"
    assert main([str(out), "--seed", "0", "--dtype", "f16"]) == 0
    assert out.is_file() and str(out.stat().st_size) in capsys.readouterr().out
    assert _sha(out) == _sha(write_tiny_gguf(tmp_path / "f16.gguf", dtype="f16"))


# ----------------------------------------------------------------------------------- llama.cpp


def test_loads_and_generates_in_llama_cpp(llama_base_url):
    """llama.cpp's own server loads the generated model: its vocabulary, tokenizer and greedy decoding."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(path: str, body: dict | None = None) -> dict:
        req = _post(llama_base_url + path, body) if body is not None else llama_base_url + path
        with opener.open(req, timeout=60) as resp:
            return json.load(resp)

    assert call("/v1/models")["data"][0]["meta"]["n_vocab"] == TINY_VOCAB_SIZE
    ids = call("/tokenize", {"content": "Hello world", "add_special": True})["tokens"]
    assert ids[0] == BOS_ID and len(ids) == 3  # <s> ▁Hello ▁world
    assert call("/detokenize", {"tokens": ids[1:]})["content"].strip() == "Hello world"
    body = {"prompt": "Hello", "n_predict": 16, "temperature": 0, "cache_prompt": False}
    out = call("/completion", body)
    assert out["tokens_predicted"] >= 1 and isinstance(out["content"], str)
    assert call("/completion", body)["content"] == out["content"]  # greedy is deterministic


def _post(url: str, body: dict, timeout: float = 60) -> urllib.request.Request:
    return urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )


def test_llama_cpp_server_serves_openai_api(llama_base_url):
    """The session's real server (tests/conftest.py) serves the tiny model through the OpenAI API."""
    base = llama_base_url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base + "/v1/models", timeout=30) as resp:
        models = json.load(resp)
    assert [m["id"] for m in models["data"]] == [TINY_MODEL_NAME]

    body = {"model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    with opener.open(_post(base + "/v1/completions", body), timeout=60) as resp:
        comp = json.load(resp)
    assert comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] >= 1

    with opener.open(_post(base + "/v1/completions", {**body, "stream": True}), timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [ln.decode().strip() for ln in resp if ln.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1] if e.startswith("data: {")]
    assert len(chunks) >= 1 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == comp["choices"][0]["text"]

    chat = {"model": TINY_MODEL_NAME, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    with opener.open(_post(base + "/v1/chat/completions", chat), timeout=60) as resp:
        reply = json.load(resp)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["usage"]["prompt_tokens"] > 5
