"""`ssmlm-generate`: sample text from a trained run, streamed to stdout as it is produced.

    ssmlm-generate run_dir=outputs/runs/default prompt="एक दिन" max_new_tokens=300
    ssmlm-generate run_dir=RUN ckpt=last prompt=Once upon a time temperature=0 num_samples=1
    ssmlm-generate run_dir=RUN device=cuda cuda_graph=true top_p=0.95 top_k=50 seed=7

The prompt runs through the model once in parallel form (``forward(prompt, return_state=True)``); every new
token then costs one recurrent ``step`` on the O(1)-size state, never a pass over the prefix. On CUDA the
step can be captured once in a CUDA graph and replayed per token. Keys and defaults: conf/generate.yaml.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree

from ssmlm.errors import ConfigError, DataError, SsmlmError
from ssmlm.models.base import LanguageModel
from ssmlm.run_dir import RunDir, build_model, pick_device, read_checkpoint, tool_config
from ssmlm.sampling import Sampling


def room_for(model: LanguageModel, prompt_len: int, max_new_tokens: int) -> int:
    """How many of ``max_new_tokens`` the model can generate after a prompt of ``prompt_len`` tokens.

    Recurrent models: all. A model with learned positions stops at the last one it has
    (``model.max_positions``); otherwise position-dependent state (KV caches) is sized for all of them at once.
    """
    limit = model.max_positions
    needed = prompt_len + max_new_tokens - 1  # the last new token is never fed back
    if limit is not None and needed > limit:
        return max(0, limit - prompt_len + 1)
    if model.reserve_positions(needed):
        print(f"# note: generating {needed} positions, past the cache size the model was configured with",
              file=sys.stderr)
    return max_new_tokens


class GraphedStep:
    """``model.step`` captured in a CUDA graph for a fixed batch size and state layout.

    A graph replays fixed kernels on fixed memory, so the token and the state live in static buffers. Models
    return *new* state tensors from ``step``; the captured graph copies them back into the static buffers, so
    each replay advances the state in place. Works for any state that is a pytree (lists, tuples, dicts) of
    tensors; a state holding anything else (the Transformer's KV cache, whose length is a Python int that
    changes every step) cannot be replayed and is refused.
    """

    def __init__(self, model: LanguageModel, state: Any, warmup_steps: int = 2):
        leaves = pytree.tree_leaves(state)
        if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in leaves):
            raise ConfigError(f"cuda_graph=true needs a recurrent state made only of CUDA tensors; "
                              f"{type(model).__name__}'s state is {type(state).__name__}. Use cuda_graph=false.")
        batch_size = leaves[0].shape[0]
        self.model = model
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=leaves[0].device)
        self.state = pytree.tree_map(torch.clone, state)
        # warm-up on a side stream (lazy initialisation, autotuning) on a copy, so the static state stays put
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            scratch = pytree.tree_map(torch.clone, self.state)
            for _ in range(warmup_steps):
                _, scratch = model.step(self.tokens, scratch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, new_state = model.step(self.tokens, self.state)
            for static, new in zip(pytree.tree_leaves(self.state), pytree.tree_leaves(new_state)):
                static.copy_(new)

    def fits(self, state: Any) -> bool:
        """Whether ``state`` has the layout the graph was captured for."""
        leaves, static = pytree.tree_leaves(state), pytree.tree_leaves(self.state)
        return len(leaves) == len(static) and all(
            isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(leaves, static))

    def load_state(self, state: Any) -> None:
        for static, value in zip(pytree.tree_leaves(self.state), pytree.tree_leaves(state)):
            static.copy_(value)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, vocab); valid until the next call."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def never_sampled(tokenizer) -> list[int]:
    """Ids that stand for no text: ``<pad>`` and ``<unk>`` of a character vocabulary (they would print as U+FFFD).
    A byte vocabulary has none (its id 0 is also the NUL byte; its boundary id ends a document)."""
    if getattr(tokenizer, "unit", None) != "char":
        return []
    return [i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "unk_id", None)) if i is not None]


class Decoder:
    """Prefill in parallel, then sample token by token with the recurrent step (eager or CUDA graph); the
    ``banned`` ids (:func:`never_sampled`) get zero probability, also when decoding greedily."""

    def __init__(self, model: LanguageModel, cuda_graph: bool = False, banned: list[int] | tuple[int, ...] = ()):
        self.model = model.eval()
        self.cuda_graph = cuda_graph
        self.banned = list(banned)
        self._graph: GraphedStep | None = None

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """prompt (batch, L) -> (logits after the last prompt token (batch, vocab), state after it)."""
        logits, state = self.model(prompt, return_state=True)
        return logits[:, -1], state

    @torch.inference_mode()
    def tokens(self, logits: torch.Tensor, state: Any, max_new_tokens: int, sampling: Sampling,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yields ``max_new_tokens`` next tokens (batch,), continuing from ``prefill``'s output.

        ``state`` is not modified (a copy is advanced), so one prefill can seed several samples.
        """
        if self.cuda_graph:
            if self._graph is None or not self._graph.fits(state):
                self._graph = GraphedStep(self.model, state)
            self._graph.load_state(state)
        else:
            state = copy.deepcopy(state)  # the Transformer's KV cache is written in place
        for i in range(max_new_tokens):
            if self.banned:
                logits = logits.index_fill(-1, torch.tensor(self.banned, device=logits.device), float("-inf"))
            token = sampling(logits, generator)
            yield token
            if i + 1 < max_new_tokens:
                if self._graph is not None:
                    logits = self._graph(token)
                else:
                    logits, state = self.model.step(token, state)


def encode_prompt(tokenizer, prompt: str, allow_unk: bool) -> list[int]:
    """Prompt ids. Characters a character vocabulary lacks are an error unless ``allow_unk`` (then <unk>).
    An empty prompt starts a new document: the byte vocabulary's boundary token, or a newline."""
    if not prompt:
        boundary = getattr(tokenizer, "boundary_id", None)
        if boundary is not None:
            return [boundary]
        prompt = "\n"
    ids = tokenizer.encode(prompt)
    unk_id = getattr(tokenizer, "unk_id", None)
    if unk_id is not None and not allow_unk and unk_id in ids:
        from ssmlm.data.tokenizers import nfc

        text = nfc(prompt)  # encode normalises to NFC, one id per character of it
        unknown = sorted({ch for ch, i in zip(text, ids) if i == unk_id})
        shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in unknown)
        raise DataError(f"the prompt contains {len(unknown)} character(s) the run's vocabulary never saw in "
                        f"training: {shown}. Remove them, or pass allow_unk=true to map them to <unk>.")
    return ids


def stream_sample(decoder: Decoder, tokenizer, logits: torch.Tensor, state: Any, max_new_tokens: int,
                  sampling: Sampling, generator: torch.Generator | None, write) -> str:
    """One sample (batch 1) continuing ``prefill``'s output; ``write`` gets each piece of text as soon as it
    is complete (a character split over several byte tokens is held back until its last byte). Returns it."""
    stream, pieces = tokenizer.stream_decoder(), []
    for token in decoder.tokens(logits, state, max_new_tokens, sampling, generator):
        pieces.append(stream.feed(int(token[0])))
        if pieces[-1]:
            write(pieces[-1])
    pieces.append(stream.flush())
    if pieces[-1]:
        write(pieces[-1])
    return "".join(pieces)


def generate(cfg) -> list[str]:
    """Runs ``ssmlm-generate`` for a config from conf/generate.yaml; streams to stdout, returns the samples."""
    if not cfg.run_dir:
        raise ConfigError("pass run_dir=<directory of a training run> (e.g. outputs/runs/default)")
    if cfg.max_new_tokens < 1 or cfg.num_samples < 1:
        raise ConfigError("max_new_tokens and num_samples must be positive")
    run = RunDir(cfg.run_dir)
    device = pick_device(str(cfg.device))
    if cfg.cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph=true needs a CUDA device (device={cfg.device} gives {device}); "
                          f"use device=cuda or cuda_graph=false")
    path = run.checkpoint(cfg.ckpt)
    ckpt = read_checkpoint(path)
    tokenizer = run.tokenizer(ckpt)
    model = build_model(ckpt, device, path)
    sampling = Sampling(temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p))
    prompt_ids = encode_prompt(tokenizer, str(cfg.prompt), bool(cfg.allow_unk))
    if room_for(model, len(prompt_ids), cfg.max_new_tokens) < cfg.max_new_tokens:
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens={cfg.max_new_tokens} exceed the "
                          f"model's max_seq_len={model.max_positions} (its learned positions); lower max_new_tokens "
                          f"or shorten the prompt")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    decoder = Decoder(model, cuda_graph=bool(cfg.cuda_graph), banned=never_sampled(tokenizer))
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    print(f"# {path} ({type(model).__name__}, {model.num_params() / 1e6:.2f}M parameters) on {device}",
          file=sys.stderr)
    logits, state = decoder.prefill(torch.tensor([prompt_ids], device=device))
    samples = []
    for n in range(int(cfg.num_samples)):
        if cfg.num_samples > 1:
            write(f"--- sample {n + 1}/{cfg.num_samples} ---\n")
        write(str(cfg.prompt))
        start = time.perf_counter()
        samples.append(stream_sample(decoder, tokenizer, logits, state, int(cfg.max_new_tokens), sampling,
                                     generator, write))
        seconds = time.perf_counter() - start
        write("\n")
        print(f"# {cfg.max_new_tokens} tokens in {seconds:.2f}s ({cfg.max_new_tokens / seconds:.1f} tokens/s)",
              file=sys.stderr)
    return samples


def main(argv: list[str] | None = None) -> None:
    try:
        generate(tool_config("generate", sys.argv[1:] if argv is None else argv))
    except SsmlmError as e:
        print(f"ssmlm-generate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
