"""Helper run by test_checkpoint_resume: zero_to_fp32 output -> plain GPTModel, same logits as
the weights DeepSpeed itself holds in the checkpoint."""

import dataclasses
import json
import sys

import torch

from helpers.configs import train_args
from localopt_plugin.data.synthetic import SyntheticConfig, synthetic_video_tokens
from localopt_plugin.model import ModelConfig, build_gpt_model, compute_logits, forward_hidden
from localopt_plugin.training.convert import load_fp32_state_dict, load_into_gptmodel
from localopt_plugin.training.distributed import init_distributed

fp32_dir, ckpt_dir, flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
args = train_args(*flags)
init_distributed(seed=args.seed)
source = synthetic_video_tokens(SyntheticConfig.from_args(args), seed=args.seed)
config = dataclasses.replace(ModelConfig.from_args(args),
                             max_position_embeddings=source.layout.input_length)
converted = build_gpt_model(config, source.vocab.size, seed=args.seed)
load_into_gptmodel(converted, load_fp32_state_dict(fp32_dir))

tag = open(f"{ckpt_dir}/latest").read().strip()
module_states = torch.load(f"{ckpt_dir}/{tag}/mp_rank_00_model_states.pt", weights_only=False)
held = build_gpt_model(config, source.vocab.size, seed=args.seed)
load_into_gptmodel(held, module_states["module"])
fresh = build_gpt_model(config, source.vocab.size, seed=args.seed)

tokens = next(source.valid.batches(2, 0, 1, seed=0))["tokens"][:, :-1]
positions = torch.arange(tokens.shape[1])
with torch.no_grad():
    a, b, c = (compute_logits(m, forward_hidden(m, tokens, positions))
               for m in (converted, held, fresh))
torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
assert not torch.allclose(a, c), "the converted model equals an untrained one"
print("logits match")

# negative control: a conversion that mixed up two layers' names fails the same comparison
state = load_fp32_state_dict(fp32_dir)
swapped = {name.replace("layers.0.", "layers.#.").replace("layers.1.", "layers.0.")
           .replace("layers.#.", "layers.1."): value for name, value in state.items()}
mixed = build_gpt_model(config, source.vocab.size, seed=args.seed)
load_into_gptmodel(mixed, swapped)
with torch.no_grad():
    e = compute_logits(mixed, forward_hidden(mixed, tokens, positions))
assert not torch.allclose(e, b, rtol=1e-6, atol=1e-6), "swapped layers pass the comparison"
print("swapped layers fail")

# the checkpoint alone (saved flags, vocabulary, layout) rebuilds the same model
from localopt_plugin.training.convert import load_trained_model  # noqa: E402

rebuilt, meta = load_trained_model(ckpt_dir)
assert meta["layout"]["num_frames"] == source.layout.num_frames
with torch.no_grad():
    d = compute_logits(rebuilt, forward_hidden(rebuilt, tokens, positions))
torch.testing.assert_close(d, b, rtol=1e-6, atol=1e-6)
print("rebuilt from checkpoint")
