"""Reference fixtures from an independent implementation (Hugging Face transformers).

Builds tiny Mamba-1 and Mamba-2 language models with random weights shaped like ma2mba's
`tiny-mamba` and `tiny-mamba2` presets, and writes for each, under OUT/<name>/:
  config.json            the transformers config (Hugging Face naming)
  model.safetensors      the weights (f32, Hugging Face tensor names)
  tokens.json            input ids, [batch][seq]
  logits.safetensors     logits of the forward pass in float64 ("logits", [B, L, V])
  generate.json          greedy continuation of each prompt (float64, no sampling)
  grads.safetensors      float64 gradient of every parameter of the mean next-token
                         cross-entropy (labels = input ids, shifted inside the model)
  loss.json              that loss
Run on the GPU machine (torch + transformers 5.x are there): python3 scripts/make_fixtures.py OUT
The computation runs on the CPU in float64 with the transformers reference (slow) path.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

torch.manual_seed(20261128)
OUT = sys.argv[1] if len(sys.argv) > 1 else "fixtures"


def randomize(model):
    """Replace every parameter with random values large enough to exercise every path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
                p.copy_(torch.rand_like(p) * 2 - 3)
            elif name.endswith(".D"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)


def dump(name, model, config, tokens):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    config.save_pretrained(d)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    # The head is tied: keep one copy, as published checkpoints do.
    state.pop("lm_head.weight", None)
    save_file(state, os.path.join(d, "model.safetensors"))
    model64 = model.to(torch.float64).eval()
    # The f32-stored weights are what ma2mba reads: compute the reference from exactly those.
    with torch.no_grad():
        for k, p in model64.named_parameters():
            p.copy_(p.to(torch.float32).to(torch.float64))
        ids = torch.tensor(tokens)
        logits = model64(input_ids=ids, use_cache=False).logits
        gen = [
            model64.generate(
                input_ids=ids[b : b + 1], max_new_tokens=8, do_sample=False, use_cache=False,
                pad_token_id=0,
            )[0].tolist()
            for b in range(ids.shape[0])
        ]
    save_file({"logits": logits.contiguous()}, os.path.join(d, "logits.safetensors"))
    model64.zero_grad()
    out = model64(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {k: p.grad.detach().contiguous() for k, p in model64.named_parameters() if p.grad is not None}
    save_file(grads, os.path.join(d, "grads.safetensors"))
    with open(os.path.join(d, "loss.json"), "w") as f:
        json.dump({"loss": float(out.loss)}, f)
    with open(os.path.join(d, "tokens.json"), "w") as f:
        json.dump(tokens, f)
    with open(os.path.join(d, "generate.json"), "w") as f:
        json.dump({"max_new_tokens": 8, "sequences": gen}, f)
    print(name, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


def tokens(vocab, batch, seq):
    return torch.randint(0, vocab, (batch, seq)).tolist()


# tiny-mamba: mamba_lm(d_model: 16, n_layer: 2, vocab_size: 61, d_state: 4), vocab padded to 64
c1 = MambaConfig(
    vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
    time_step_rank=1, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
    tie_word_embeddings=True, residual_in_fp32=True, intermediate_size=32,
)
m1 = MambaForCausalLM(c1)
randomize(m1)
dump("tiny-mamba", m1, c1, tokens(61, 2, 13))

# tiny-mamba2: mamba2_lm(d_model: 32, n_layer: 2, vocab_size: 61, d_state: 8, headdim: 16,
# chunk_size: 8), vocab padded to 64; ngroups = 1 (transformers normalises the gated norm over
# the full width, which equals the reference only for one group)
c2 = Mamba2Config(
    vocab_size=64, hidden_size=32, state_size=8, num_heads=4, head_dim=16, n_groups=1,
    expand=2, conv_kernel=4, chunk_size=8, num_hidden_layers=2, use_bias=False,
    use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    residual_in_fp32=True, rms_norm=True, norm_before_gate=False,
    time_step_limit=(0.0, float("inf")),
)
m2 = Mamba2ForCausalLM(c2)
randomize(m2)
dump("tiny-mamba2", m2, c2, tokens(61, 2, 13))
