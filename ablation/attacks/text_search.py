"""`text-search`: Ring-A-Bell-style search for prompts, using the text encoder only.

Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?" (ICLR 2024):
the concept's direction in the text encoder's output space is the mean difference between prompts
with and without it, d = mean E(target prompt) - mean E(anchor prompt) (`[L, D]`, the whole hidden
sequence the UNet attends to). For an anchor prompt p the wanted embedding is E(p) + eta * d, and a
genetic search looks for K tokens t such that E(p + t) is closest to it (mean squared error). The
search never runs the UNet, so its prompts are plain text and transfer to any model sharing the
text encoder. Mutations are drawn from the top-k tokens of the gradient with respect to a one-hot
token choice (as HotFlip / GCG), which makes a small fixed budget of text-encoder evaluations
enough; tokens of the target's own name are never proposed (that would be the `prompts` attack).

Budget: total candidate evaluations (text-encoder rows), split over the anchor prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ablation.attacks.common import AttackContext, Cost, Item, check_single_encoder, counting

DEFAULT_TOKENS = 4
POPULATION = 16
ELITES = 4
TOP_K = 32


def allowed_vocabulary(tokenizer, exclude_text: str) -> torch.Tensor:
    """Ids of whole-word, alphabetic ASCII tokens (they survive decode -> re-tokenize), minus the excluded words'."""
    excluded = set(tokenizer(exclude_text, add_special_tokens=False).input_ids)
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if tok.endswith("</w>") and tok[:-4].isascii() and tok[:-4].isalpha() and i not in excluded]
    return torch.tensor(sorted(ids), dtype=torch.long)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


class Encoder:
    """E(ids): the text encoder on explicit token sequences, padded as the pipeline pads."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.tok = pipe.tokenizer
        self.length = self.tok.model_max_length
        self.device = pipe.text_encoder.device

    def batch(self, sequences: list[list[int]]) -> torch.Tensor:
        rows = []
        for seq in sequences:
            seq = [self.tok.bos_token_id, *seq][:self.length - 1] + [self.tok.eos_token_id]
            rows.append(seq + [self.tok.pad_token_id] * (self.length - len(seq)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        return self.pipe.text_encoder(self.batch(sequences))[0].float()


def concept_direction(ctx: AttackContext, enc: Encoder) -> torch.Tensor:
    """d = mean E(target prompts) - mean E(anchor prompts), `[L, D]`."""
    task = ctx.task
    with torch.no_grad():
        target = enc([_ids(enc.tok, p) for p in task.prompts[task.target]]).mean(0)
        anchor = enc([_ids(enc.tok, p) for p in task.prompts[task.anchor]]).mean(0)
    return target - anchor


def _gradient_candidates(enc: Encoder, prefix: list[int], slots: list[int], goal: torch.Tensor,
                         vocab: torch.Tensor) -> torch.Tensor:
    """`[K, TOP_K]` token ids per slot whose one-hot gradient most decreases the loss."""
    weight = enc.pipe.text_encoder.get_input_embeddings().weight
    onehot = torch.zeros(len(slots), weight.shape[0], device=weight.device)
    onehot[torch.arange(len(slots)), torch.tensor(slots)] = 1.0
    onehot.requires_grad_(True)
    ids = enc.batch([prefix + slots])
    start = 1 + len(prefix)
    layer = enc.pipe.text_encoder.get_input_embeddings()

    def hook(_m, _args, output):
        out = output.clone()
        out[:, start:start + len(slots)] = (onehot @ weight.detach()).to(out.dtype)
        return out

    handle = layer.register_forward_hook(hook)
    try:
        loss = F.mse_loss(enc.pipe.text_encoder(ids)[0].float()[0], goal)
        loss.backward()
    finally:
        handle.remove()
    grad = onehot.grad[:, vocab]  # only allowed tokens
    top = (-grad).topk(min(TOP_K, len(vocab)), dim=-1).indices
    return vocab.to(top.device)[top]


def search(ctx: AttackContext, enc: Encoder, prompt: str, direction: torch.Tensor, evaluations: int, k: int,
           eta: float, vocab: torch.Tensor, g: torch.Generator) -> tuple[list[int], float, float]:
    """Genetic search for k tokens after `prompt`; returns the best tokens, its loss and the start's."""
    prefix = _ids(enc.tok, prompt)[:enc.length - 2 - k]
    with torch.no_grad():
        goal = enc([prefix])[0] + eta * direction

    def loss_of(pop: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            e = enc([prefix + s for s in pop])
        return ((e - goal) ** 2).mean(dim=(1, 2))

    pop = [vocab[torch.randint(0, len(vocab), (k,), generator=g)].tolist() for _ in range(POPULATION)]
    scores = loss_of(pop)
    start_loss = float(scores.min())
    used = POPULATION
    while used + POPULATION <= evaluations:
        order = scores.argsort().tolist()
        pop = [pop[i] for i in order]
        scores = scores[order]
        candidates = _gradient_candidates(enc, prefix, pop[0], goal, vocab).cpu()
        children = [list(p) for p in pop[:ELITES]]
        while len(children) < POPULATION:
            a, b = (pop[int(i)] for i in torch.randint(0, POPULATION // 2, (2,), generator=g))
            take = torch.rand(k, generator=g) < 0.5
            child = [x if t else y for x, y, t in zip(a, b, take.tolist(), strict=True)]
            slot = int(torch.randint(0, k, (1,), generator=g))
            child[slot] = int(candidates[slot, int(torch.randint(0, candidates.shape[1], (1,), generator=g))])
            children.append(child)
        pop = children
        scores = loss_of(pop)
        used += POPULATION
    best = int(scores.argmin())
    return pop[best], float(scores[best]), start_loss


def run(ctx: AttackContext, budget: int, k: int = DEFAULT_TOKENS, eta: float = 1.0) -> dict:
    """Search K tokens for each anchor prompt (budget: text-encoder evaluations in all); ASR on both models."""
    check_single_encoder(ctx.pipe, "text-search")
    task = ctx.task
    cost = Cost()
    g = torch.Generator().manual_seed(ctx.seed)
    anchors = list(task.prompts[task.anchor])
    step = max(1, len(anchors) // ctx.num_prompts)
    anchors = anchors[::step][:ctx.num_prompts]
    per_prompt = max(POPULATION, budget // len(anchors))
    rows, items = [], []
    with counting(ctx.pipe, cost):
        enc = Encoder(ctx.pipe)
        direction = concept_direction(ctx, enc)
        vocab = allowed_vocabulary(enc.tok, task.target)
        for prompt in anchors:
            tokens, loss, start = search(ctx, enc, prompt, direction, per_prompt, k, eta, vocab, g)
            words = enc.tok.decode(tokens, clean_up_tokenization_spaces=False).strip()
            text = f"{prompt} {words}"
            items.append(Item(text))
            rows.append({"prompt": text, "anchor_prompt": prompt, "tokens": tokens, "loss": loss,
                         "loss_random_start": start})
    return {"asr": ctx.asr_both(items, "text_search"), "cost": cost.as_dict(), "prompts": rows,
            "details": {"tokens": k, "eta": eta, "evaluations_per_prompt": per_prompt, "population": POPULATION,
                        "direction_norm": float(direction.norm()), "vocabulary": int(len(vocab))}}
