"""Small shared builders for tests: tiny random models of several transformers families; a reconstruction
error to compare pruned weights by."""
import torch
import transformers


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W_hat X||_F / ||W X||_F for inputs ``x`` [tokens, in_features]."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ weight.float().T
    return ((ref - x @ pruned.float().T).norm() / ref.norm()).item()


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=128, max_position_embeddings=64)
    if family == "bert":
        cfg = transformers.BertConfig(**common)
        cfg.architectures = ["BertModel"]
        return transformers.BertModel(cfg).eval()
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma"}[family]
    cfg = getattr(transformers, f"{cls}Config")(num_key_value_heads=2, head_dim=16, **common)
    cfg.architectures = [f"{cls}ForCausalLM"]
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def random_rotations(model, blocks: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg, layers = model.config, model.model.layers
    d, hd = cfg.hidden_size, layers[0].self_attn.head_dim

    def orth(*shape):
        return torch.linalg.qr(torch.randn(*shape, generator=gen, dtype=torch.float64))[0].float()

    q1s = [orth(d, d) if blocks == 1 else orth(blocks, d // blocks, d // blocks) for _ in layers]
    r2s = [orth(cfg.num_key_value_heads, hd, hd) for _ in layers]
    return q1s, r2s


def masked_dense_copy(model, sparse_model):
    """A copy of ``model`` whose linears hold exactly the decompressed weights of ``sparse_model``."""
    import copy

    from sparse_runtime import SparseLinear

    dense = copy.deepcopy(model)
    for name, mod in sparse_model.named_modules():
        if isinstance(mod, SparseLinear):
            dense.get_submodule(name).weight.data = mod.dense_weight().clone()
    return dense


def write_stories_gguf(stories_dir, path, drop=(), name="stories260K"):
    """stories260K as a float32 GGUF file, laid out as llama.cpp writes a Llama (q/k rows permuted per
    head; tied embeddings: no output.weight), with its sentencepiece vocabulary. ``drop``: tensors to leave out;
    ``name``: the general.name metadata (a different one gives a different file)."""
    import gguf
    import numpy as np
    import sentencepiece
    from safetensors.torch import load_file

    cfg = transformers.AutoConfig.from_pretrained(stories_dir)
    sd = load_file(f"{stories_dir}/model.safetensors")

    def permute(w, heads):  # HF -> GGUF rotary layout (transformers undoes it on load)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{stories_dir}/tokenizer.model")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(sp.vocab_size())])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for hf, name in names.items():
        if name in drop:
            continue
        t = sd[hf].float()
        if name.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_shards(folder, tensors: dict, n: int = 2) -> dict:
    """``tensors`` as ``n`` safetensors shards plus a ``model.safetensors.index.json`` in ``folder``."""
    import json

    from safetensors.torch import save_file

    keys, weight_map = sorted(tensors), {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in keys[i::n]}, str(folder / name))
        weight_map.update({k: name for k in keys[i::n]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map
