"""`ablate attack` and the robust-ablation building block: tiny random pipelines (fast), toy world (slow)."""

import json

import pytest
import torch

from ablation.adversary import target_positions
from ablation.attacks import ATTACKS, AttackSettings, adversarial_target_embeddings, run_attacks
from ablation.attacks.common import PLACEHOLDER, placeholder_id, replace_name, token_overrides
from ablation.attacks.prompts import CATEGORIES, attack_prompts, prompt_sets
from ablation.checkpoint import make_metadata, pipeline_config_hash, save_delta
from ablation.cli import main
from ablation.evaluation.clip_judge import ClipJudge
from ablation.testing import tiny_clip, tiny_pipeline

TINY = dict(num_prompts=2, num_samples=1, num_references=2, steps=2, batch_size=4, device="cpu")
TINY_BUDGETS = {"prompts": 3, "text-search": 32, "prefix": 2, "inversion": 2, "relearn": 2}


def _tiny_clip(path):
    return tiny_clip(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny sd1 pipeline, a tiny CLIP and a run whose delta perturbs the cross-attention K/V."""
    root = tmp_path_factory.mktemp("attack_world")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "sd1")
    gen = torch.Generator().manual_seed(1)
    tensors = {f"unet.{n}": p.detach() + 0.5 * torch.randn(p.shape, generator=gen)
               for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    meta = make_metadata(base_model=str(root / "sd1"), base_config_hash=pipeline_config_hash(pipe),
                         concepts=[{"target": "grumpy cat", "anchor": "cat", "concept_type": "instance"}],
                         params="cross-attn", lora_rank=0, steps=1, learning_rate=1e-3, variant="model-based")
    save_delta(root / "run" / "delta.safetensors", tensors, meta)
    clip = _tiny_clip(root / "clip")
    return {"root": root, "sd1": str(root / "sd1"), "run": str(root / "run"), "clip": clip,
            "judge": ClipJudge(clip, device="cpu")}


def _settings(world, out, attacks, seed=0, **kw):
    return AttackSettings(base=world["sd1"], ablated=world["run"], attacks=tuple(attacks), out=str(out), seed=seed,
                          family="toy/grumpy_cat", clip=world["clip"], **{**TINY, **kw})


def _run(world, out, attack, seed=0, **kw):
    budget = kw.pop("budget", TINY_BUDGETS[attack])
    return run_attacks(_settings(world, out, [attack], seed, budget=budget, **kw), judge=world["judge"])


# ------------------------------------------------------------------ pieces


def test_prompt_sets_cover_toy_and_paper_targets():
    from ablation.evaluation.prompts import paper_task, paper_task_names
    from ablation.toyworld import catalog

    sets = prompt_sets()
    targets = {f.target.lower() for f in catalog().families.values()}
    targets |= {paper_task(n).target.lower() for n in paper_task_names()}
    assert targets <= set(sets), targets - set(sets)
    for target, cats in sets.items():
        assert set(cats) == set(CATEGORIES), target
        assert all(cats[c] for c in CATEGORIES), target


def test_attack_prompts_round_robin_and_budget():
    prompts = ["a snapshot of a grumpy cat", "a snapshot of a grumpy cat on a beach"]
    pairs = attack_prompts("grumpy cat", prompts, 5, ["my own prompt"])
    assert pairs[0] == ("user", "my own prompt")
    assert [c for c, _ in pairs[1:]] == list(CATEGORIES)[:4]
    assert pairs[1] == ("paraphrase", "a snapshot of a grumpy kitty")
    assert pairs[2] == ("synonym", "a snapshot of a grouchy cat on a beach")
    assert len(attack_prompts("grumpy cat", prompts, 1000)) == sum(len(v) for v in prompt_sets()["grumpy cat"].values())
    assert replace_name("Grumpy Cat on a sofa", "grumpy cat", "x") == "x on a sofa"
    assert replace_name("a painting", "van gogh", "x") == "x, a painting"


def test_token_overrides_replace_each_occurrence_and_carry_gradients():
    pipe = tiny_pipeline("sd1")
    pid = placeholder_id(pipe.tokenizer)
    vectors = torch.randn(2, 32, requires_grad=True)
    ids = pipe.tokenizer([f"a {PLACEHOLDER} {PLACEHOLDER} {PLACEHOLDER} cat", "a cat"], padding="max_length",
                         return_tensors="pt").input_ids
    layer = pipe.text_encoder.get_input_embeddings()
    with token_overrides(pipe.text_encoder, pid, vectors):
        out = layer(ids)
    plain = layer(ids)
    assert torch.equal(out[0, 2], vectors[0]) and torch.equal(out[0, 3], vectors[1]) and torch.equal(out[0, 4],
                                                                                                      vectors[1])
    assert torch.equal(out[1], plain[1]) and torch.equal(out[0, 1], plain[0, 1])
    out.sum().backward()
    assert vectors.grad.abs().sum() > 0


# ------------------------------------------------------------------ every attack on the tiny pipeline


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_writes_its_report(world, tmp_path, attack):
    state = {k: v.clone() for k, v in tiny_pipeline("sd1").unet.state_dict().items()}
    out = tmp_path / "out"
    report = _run(world, out, attack)
    saved = json.loads((out / "attack.json").read_text())
    assert saved["attacks"][0]["attack"] == attack and (out / "attack.md").is_file()
    a = saved["attacks"][0]
    assert a["budget"] == TINY_BUDGETS[attack]
    assert (out / a["grid"]).is_file()
    for model in ("base", "ablated"):
        assert 0.0 <= saved["plain"][model] <= 1.0
    assert 0.0 <= a["asr"]["ablated"] <= 1.0
    assert set(a["cost"]) == {"seconds", "unet_forward", "unet_forward_rows", "unet_backward", "text_encoder_forward"}
    assert len(list((out / "images" / "plain" / "ablated").glob("*.png"))) == 2
    if attack in ("prefix", "inversion", "relearn"):  # trained through the UNet: one backward per step
        steps = TINY_BUDGETS[attack] * (TINY["num_prompts"] if attack == "prefix" else 1)
        assert a["cost"]["unet_backward"] == steps and a["cost"]["unet_forward"] == steps
        assert (out / "images" / "references").is_dir()
    if attack == "text-search":
        assert a["cost"]["unet_forward"] == 0 and a["cost"]["text_encoder_forward"] > 0
        assert all(p["prompt"].startswith(p["anchor_prompt"]) for p in a["prompts"])
        assert all("grumpy" not in p["prompt"][len(p["anchor_prompt"]):] for p in a["prompts"])
    if attack in ("prefix", "inversion"):
        assert (out / a["tensors"]).is_file()
    if attack == "relearn":
        assert a["details"]["curve"][0]["step"] == 0 and a["asr"]["base"] is None
    assert report["attacks"][0]["asr"] == a["asr"]
    # the base weights are back (the attacks undo what they change)
    reloaded = tiny_pipeline("sd1").unet.state_dict()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_relearn_restores_the_ablated_weights_and_moves_during_training(world, tmp_path):
    from ablation.attacks import relearn
    from ablation.attacks.common import AttackContext
    from ablation.evaluation.prompts import toy_task
    from ablation.models import load_pipeline
    from ablation.sampling.generate import SamplingSettings, set_scheduler

    pipe = load_pipeline(world["sd1"])
    set_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.requires_grad_(False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ctx = AttackContext(pipe=pipe, delta=world["run"], task=toy_task("grumpy_cat"), judge=world["judge"],
                        sampling=SamplingSettings(steps=2), num_prompts=1, num_samples=1, num_references=2,
                        metadata={"params": "cross-attn", "learning_rate": "0.01"})
    ctx.plain = {"base": 1.0}  # threshold 0.5: not reached on a random model, so every step runs
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.append(m.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.sum().item()))
    out = relearn.run(ctx, 3, eval_every=3)
    hook.remove()
    assert out["details"]["steps_done"] == 3
    assert len(set(round(s, 6) for s in seen)) >= 3  # the ablation, then relearned weights
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_same_seed_same_result_other_seed_other_images(world, tmp_path):
    a = _run(world, tmp_path / "a", "text-search")
    b = _run(world, tmp_path / "b", "text-search")
    assert [p["prompt"] for p in a["attacks"][0]["prompts"]] == [p["prompt"] for p in b["attacks"][0]["prompts"]]
    assert a["attacks"][0]["asr"] == b["attacks"][0]["asr"] and a["plain"] == b["plain"]
    for png in (tmp_path / "a" / "images").rglob("*.png"):
        assert png.read_bytes() == (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes()
    i1 = _run(world, tmp_path / "i1", "inversion", budget=3)
    i2 = _run(world, tmp_path / "i2", "inversion", budget=3)
    assert i1["attacks"][0]["details"]["loss_curve"] == i2["attacks"][0]["details"]["loss_curve"]
    assert i1["attacks"][0]["asr"] == i2["attacks"][0]["asr"]
    c = _run(world, tmp_path / "c", "text-search", seed=1)
    assert [p["tokens"] for p in c["attacks"][0]["prompts"]] != [p["tokens"] for p in a["attacks"][0]["prompts"]]


def test_user_prompts_file_is_used_as_is(world, tmp_path):
    file = tmp_path / "mine.txt"
    file.write_text("# comment\na photo of a grouchy feline\n")
    report = _run(world, tmp_path / "out", "prompts", prompts_file=str(file), budget=2)
    prompts = report["attacks"][0]["prompts"]
    assert prompts[0] == {**prompts[0], "category": "user", "prompt": "a photo of a grouchy feline"}
    assert len(prompts) == 2


def test_post_attack_asr_counts_an_image_whose_plain_counterpart_already_shows_the_target():
    from ablation.attacks.common import AttackContext, Item

    ctx = AttackContext(pipe=None, delta=None, task=None, judge=None, sampling=None, num_samples=2)
    ctx.judged = lambda images: [im == "T" for im in images]  # the judge, by hand: "T" is judged the target
    ctx.gallery["plain/ablated"], ctx.rendered["plain/ablated"] = ["T", "-", "-", "-"], [Item("p0"), Item("p1")]
    # three attacked items: two from plain prompt 0 (explicit source), one defaulting to 2 % 2 = 0
    ctx.rendered["prefix/ablated"] = [Item("a", source=0), Item("b", source=1), Item("c")]
    ctx.gallery["prefix/ablated"] = ["-", "-", "-", "T", "-", "-"]
    # slots: a0 plain(0,0)=T -> 1, a1 0, b0 0, b1 attacked T -> 1, c0 plain(0,0)=T -> 1, c1 0
    assert ctx.post_attack_asr("prefix") == 3 / 6
    assert ctx.asr(ctx.gallery["prefix/ablated"]) == 1 / 6 and ctx.post_attack_asr("inversion") is None


def test_replay_renders_the_saved_items_on_another_model(world, tmp_path):
    from ablation.attacks.cli import parse

    first = run_attacks(_settings(world, tmp_path / "a", ["prompts", "text-search", "prefix", "relearn"],
                                  budgets=TINY_BUDGETS), judge=world["judge"])
    saved = json.loads((tmp_path / "a" / "attack.json").read_text())
    for a in saved["attacks"]:
        pre, post = a["asr"]["pre_attack"], a["asr"]["post_attack"]
        assert pre == saved["plain"]["ablated"] and 0.0 <= post <= 1.0, a["asr"]
    prefix = next(a for a in saved["attacks"] if a["attack"] == "prefix")
    assert len(prefix["replay"]) == TINY["num_prompts"] and all(r["vectors"] for r in prefix["replay"])
    assert "replay" not in next(a for a in saved["attacks"] if a["attack"] == "relearn")
    # the pinned command parses back to the same budgets and seed
    import shlex

    again = parse(shlex.split(saved["settings"]["command"])[2:])
    assert {a: again.budget_of(a) for a in again.attacks} == saved["settings"]["budgets"]
    assert again.seed == 0 and again.num_samples == TINY["num_samples"]
    # replay on the same ablation: the same images, hence the same ASR, and no search
    replayed = run_attacks(AttackSettings(base=world["sd1"], ablated=world["run"], replay=str(tmp_path / "a"),
                                          attacks=("prompts", "text-search", "prefix"), out=str(tmp_path / "b"),
                                          clip=world["clip"], batch_size=4, device="cpu"), judge=world["judge"])
    assert [a["attack"] for a in replayed["attacks"]] == ["prompts", "text-search", "prefix"]
    assert "## prompts" in (tmp_path / "b" / "attack.md").read_text()
    for a in replayed["attacks"]:
        orig = next(o for o in first["attacks"] if o["attack"] == a["attack"])
        assert a["asr"] == orig["asr"] and a["cost"]["unet_backward"] == 0 and a["cost"]["text_encoder_forward"] == 0
        assert [r["prompt"] for r in a["replay"]] == [r["prompt"] for r in orig["replay"]]
        folder = a["attack"].replace("-", "_")
        for png in (tmp_path / "a" / "images" / folder).rglob("*.png"):
            assert png.read_bytes() == (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes()
    # on another model (the base model given as the "ablation"): the same prompts, the base column's ASR
    other = world["root"] / "base_as_ablated"
    if not other.exists():
        tiny_pipeline("sd1").save_pretrained(other)
    moved = run_attacks(AttackSettings(base=world["sd1"], ablated=world["sd1"], replay=str(tmp_path / "a"),
                                       attacks=("prefix",), out=str(tmp_path / "c"), clip=world["clip"],
                                       batch_size=4, device="cpu"), judge=world["judge"])
    assert moved["attacks"][0]["asr"]["ablated"] == moved["attacks"][0]["asr"]["base"]
    assert moved["attacks"][0]["asr"]["base"] == prefix["asr"]["base"]


def test_replay_bad_input_one_line(world, tmp_path, capsys):
    run_attacks(_settings(world, tmp_path / "a", ["text-search"], budget=32), judge=world["judge"])
    base = ["attack", "--base", world["sd1"], "--ablated", world["run"], "--clip", world["clip"]]
    assert main([*base, "--replay", str(tmp_path / "none"), "--out", str(tmp_path / "o1")]) == 2
    assert main([*base, "--replay", str(tmp_path / "a"), "--attack", "prefix", "--out", str(tmp_path / "o2")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and "no attack.json" in errs[0] and "prefix not in that report" in errs[1], errs
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("extra, message", [
    (["--attack", "nope"], "unknown attack nope"),
    (["--attack", "inversion", "--budget", "0"], "--budget must be >= 1"),
    (["--prompts", "/no/such/file.txt"], "no such file"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--budget", "inversion=0"], "--budget inversion=0: must be >= 1"),
    (["--budget", "warp=3"], "unknown attack"),
    (["--budget", "many"], "expected N or KIND=N"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(world, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["attack", "--base", world["sd1"], "--ablated", world["run"], "--clip", world["clip"],
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_ablated_path_and_unknown_family(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attack", "--ablated", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["attack", "--base", world["sd1"], "--ablated", world["run"], "--family", "toy/nothing",
                 "--out", str(out)]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and all(e.startswith("error: ") for e in errs)
    assert not out.exists()


def test_cli_end_to_end(world, tmp_path):
    out = tmp_path / "out"
    assert main(["attack", "--base", world["sd1"], "--ablated", world["run"], "--clip", world["clip"],
                 "--attack", "prompts", "--attack", "text-search", "--budget", "16", "--num-prompts", "1",
                 "--num-samples", "1", "--steps", "2", "--family", "toy/grumpy_cat", "--out", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads((out / "attack.json").read_text())
    assert [a["attack"] for a in report["attacks"]] == ["prompts", "text-search"]
    md = (out / "attack.md").read_text()
    assert "| prompts | 16 prompts |" in md and "| text-search | 16 text-encoder evaluations |" in md
    from ablation.attacks.cli import parse

    settings = parse(["--ablated", "x", "--out", "y", "--attack", "all", "--budget", "7", "--budget", "prefix=3"])
    assert settings.attacks == tuple(ATTACKS)
    assert settings.budget_of("prefix") == 3 and settings.budget_of("relearn") == 7


# ------------------------------------------------------------------ robust building block


def _robust_batch(seed=0):
    pipe = tiny_pipeline("sd1")
    pipe.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        target, _ = pipe.encode_prompt(["a photo of a grumpy cat", "a grumpy cat on a sofa"], "cpu", 1, False)
        anchor, _ = pipe.encode_prompt(["a photo of a cat", "a cat on a sofa"], "cpu", 1, False)
        teacher = pipe.unet(noisy, t, anchor).sample
    return pipe, noisy, t, target, anchor, teacher


def test_adversarial_embeddings_raise_the_ablation_loss_within_the_bound():
    pipe, noisy, t, target, anchor, teacher = _robust_batch()
    positions = target_positions(target, anchor)
    assert positions[:, 0].sum() == 0 and positions.any(dim=1).all()  # BOS is shared, the target's tokens differ
    for p in pipe.unet.parameters():
        p.requires_grad_(True)  # as during training: the inner steps must not touch parameter gradients
    adv = adversarial_target_embeddings(pipe.unet, noisy, t, target, teacher, positions=positions, steps=3,
                                        radius=0.2, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert adv.embeds.shape == target.shape and not adv.embeds.requires_grad
    assert adv.loss_after > adv.loss_before * 1.01, (adv.loss_before, adv.loss_after)
    delta = adv.embeds - target
    assert torch.equal(delta[~positions], torch.zeros_like(delta[~positions]))  # only the target's positions move
    ratio = delta.norm(dim=-1) / target.norm(dim=-1)
    assert float(ratio.max()) <= 0.2 + 1e-5 and float(ratio.max()) > 0.1
    assert (adv.unet_forward, adv.unet_backward) == (5, 3)
    again = adversarial_target_embeddings(pipe.unet, noisy, t, target, teacher, positions=positions, steps=3,
                                          radius=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.embeds, adv.embeds)
    same = adversarial_target_embeddings(pipe.unet, noisy, t, target, teacher, steps=0)
    assert torch.equal(same.embeds, target) and same.loss_after == same.loss_before


def test_adversarial_embeddings_beat_random_perturbations_of_the_same_size():
    pipe, noisy, t, target, anchor, teacher = _robust_batch(1)
    positions = target_positions(target, anchor)
    adv = adversarial_target_embeddings(pipe.unet, noisy, t, target, teacher, positions=positions, steps=4, radius=0.2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        randoms = []
        for _ in range(4):
            d = torch.randn(target.shape, generator=g) * positions[..., None]
            d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) * 0.2 * target.norm(dim=-1, keepdim=True)
            pred = pipe.unet(noisy, t, target + d).sample
            randoms.append(float(torch.nn.functional.mse_loss(pred, teacher)))
    assert adv.loss_after > max(randoms), (adv.loss_after, randoms)


# ------------------------------------------------------------------ toy world (slow)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The README's grumpy cat ablation on the toy world, with the group pinned to what the attack figures of
    docs/robustness.md were measured on (the target's token rows), so a change of the toy default cannot move them."""
    import os

    root = tmp_path_factory.mktemp("toy_attack")
    old = os.environ.get("ABLATION_CACHE")
    os.environ["ABLATION_CACHE"] = str(root / "cache")
    try:
        assert main(["train", "--target", "grumpy cat", "--anchor", "cat", "--params", "embedding",
                     "--output-dir", str(root / "run")]) == 0
    finally:
        if old is None:
            os.environ.pop("ABLATION_CACHE", None)
        else:
            os.environ["ABLATION_CACHE"] = old
    return root / "run"


@pytest.mark.slow
def test_prefix_and_relearn_bring_grumpy_cat_back_on_the_plain_ablation(toy_run, tmp_path):
    """Measured (docs/robustness.md): prefix 0.00 -> 1.00 in 20 iterations per prompt; relearn 0.62 after 24 steps."""
    report = run_attacks(AttackSettings(ablated=str(toy_run), attacks=("prefix", "relearn"), out=str(tmp_path / "a"),
                                        device="cpu"))
    assert report["plain"]["base"] >= 0.9 and report["plain"]["ablated"] <= 0.15, report["plain"]
    prefix_, relearn_ = report["attacks"]
    assert prefix_["asr"]["ablated"] >= report["plain"]["ablated"] + 0.5, prefix_["asr"]
    assert relearn_["details"]["steps_to_recover"] is not None, relearn_["details"]["curve"]


@pytest.mark.slow
def test_inversion_recovers_grumpy_cat_on_the_plain_ablation(toy_run, tmp_path):
    """Textual inversion through the ablated toy model brings grumpy cat back (Pham et al. 2023); measured 1.00 on
    the embedding-group ablation (docs/robustness.md; on the cross-attention one it does not, 0.12)."""
    report = run_attacks(AttackSettings(ablated=str(toy_run), attacks=("inversion",), out=str(tmp_path / "a"),
                                        device="cpu"))
    a = report["attacks"][0]
    assert report["plain"]["base"] >= 0.9 and report["plain"]["ablated"] <= 0.15, report["plain"]
    assert a["asr"]["ablated"] >= report["plain"]["ablated"] + 0.5, a["asr"]


@pytest.mark.slow
def test_robust_ablation_needs_5x_the_relearning_steps(tmp_path):
    """Measured (docs/robustness.md, 32 images per cell): grumpy cat with the toy defaults (cross-attention K/V, 60
    steps); relearn (judged after 1, 2, 4, ... steps) brings the target back after 2 steps on the plain ablation and
    after 32 on the `--robust` one (weight 4, 6 ascent steps)."""
    steps, plain_asr = {}, {}
    for name, extra in (("plain", []), ("robust", ["--robust"])):
        run = tmp_path / name
        assert main(["train", "--target", "Grumpy Cat", "--anchor", "Cat", "--output-dir", str(run),
                     "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
        report = run_attacks(AttackSettings(ablated=str(run), attacks=("relearn",), out=str(tmp_path / f"a_{name}"),
                                            num_prompts=4, num_samples=4, steps=20, device="cpu"))
        recovered = report["attacks"][0]["details"]["steps_to_recover"]
        steps[name] = 10**6 if recovered is None else recovered  # None: not back within the budget
        plain_asr[name] = report["plain"]["ablated"]
    assert max(plain_asr.values()) <= 0.25, plain_asr  # both runs ablate, so relearn has something to undo
    assert steps["robust"] >= 5 * steps["plain"], steps


@pytest.mark.slow
def test_robust_ablation_lowers_prefix_and_inversion_on_the_default(tmp_path):
    """Measured (docs/robustness.md, 32 images per cell): on the toy default (cross-attention K/V) prefix and inversion
    bring grumpy cat back (0.88 / 0.88); `--robust` lowers them to 0.34 / 0.19. 16 images per cell here."""
    asr = {}
    for name, extra in (("plain", []), ("robust", ["--robust"])):
        run = tmp_path / name
        assert main(["train", "--target", "Grumpy Cat", "--anchor", "Cat", "--output-dir", str(run),
                     "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
        report = run_attacks(AttackSettings(ablated=str(run), attacks=("prefix", "inversion"),
                                            out=str(tmp_path / f"a_{name}"), num_prompts=4, num_samples=4,
                                            device="cpu"))
        assert report["plain"]["base"] >= 0.9 and report["plain"]["ablated"] <= 0.15, report["plain"]
        asr[name] = {a["attack"]: a["asr"]["post_attack"] for a in report["attacks"]}
    assert asr["plain"]["prefix"] >= 0.5 and asr["plain"]["inversion"] >= 0.5, asr
    assert asr["robust"]["prefix"] <= asr["plain"]["prefix"] - 0.25, asr
    assert asr["robust"]["inversion"] <= asr["plain"]["inversion"] - 0.25, asr


def test_robust_training_adds_the_adversarial_term(tmp_path, model_dir):
    """--robust: the loss gains a `robust` part on the adversary's micro-steps, and the run stays resumable-pure."""
    from ablation.config import ConfigError, build_config
    from ablation.trainer import train

    values = dict(model=model_dir, target=["Grumpy Cat"], anchor=["Cat"], resolution=32, num_anchor_images=4,
                  anchor_steps=2, anchor_scheduler="ddim", max_steps=4, train_batch_size=2, learning_rate=3e-3,
                  prior_preservation=False, checkpointing_steps=0, cache_dir=str(tmp_path / "cache"),
                  params="cross-attn", teacher="frozen")
    plain = train(build_config(None, {**values, "output_dir": str(tmp_path / "plain")}))
    robust = train(build_config(None, {**values, "output_dir": str(tmp_path / "robust"), "robust": True,
                                       "robust_every": 2, "robust_adversary": "ball"}))
    assert robust.steps == plain.steps == 4
    # micro-steps 0 and 2 add the adversarial term (robust_every 2): their losses grow, the others start equal
    assert robust.losses[0] > plain.losses[0] and robust.losses[2] != plain.losses[2]
    with pytest.raises(ConfigError, match="--robust needs the model-based variant"):
        build_config(None, {**values, "robust": True, "params": "embedding"})
    persistent = train(build_config(None, {**values, "output_dir": str(tmp_path / "persistent"), "robust": True,
                                           "robust_every": 2, "robust_adversary": "persistent"}))
    assert persistent.losses[0] > plain.losses[0] and persistent.losses[1] != plain.losses[1]
    prefix = train(build_config(None, {**values, "output_dir": str(tmp_path / "prefix"), "robust": True,
                                       "robust_every": 2, "robust_adversary": "prefix"}))
    assert prefix.losses[0] > plain.losses[0] and prefix.losses[0] != persistent.losses[0]
    shifted = train(build_config(None, {**values, "output_dir": str(tmp_path / "shifted"), "robust": True,
                                        "robust_every": 2, "robust_adversary": "shifted"}))
    assert shifted.losses[0] > plain.losses[0] and shifted.losses[0] not in (persistent.losses[0], prefix.losses[0])
    # with the `same` teacher the adversary still aims at the original model (its tensors are kept for it)
    same = train(build_config(None, {**values, "output_dir": str(tmp_path / "same"), "robust": True,
                                     "robust_every": 2, "robust_adversary": "persistent", "teacher": "same"}))
    assert same.losses[0] > plain.losses[0]


def test_eval_attacks_adds_the_robustness_table(world, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["eval", "--base", world["sd1"], "--ablated", world["run"], "--clip", world["clip"], "--family",
              "toy/grumpy_cat", "--num-samples", "1", "--control-samples", "0", "--steps", "2", "--out", str(out),
              "--device", "cpu"]
    assert main([*common, "--attacks", "bogus"]) == 2
    assert "--attacks bogus: choose from" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--attacks", "prompts"]) == 0
    attack = json.loads((out / "attacks" / "run" / "attack.json").read_text())
    (row,) = json.loads((out / "report.json").read_text())["robustness"]["run"]
    assert row["attack"] == "prompts" and row["attacked_ablated"] == attack["attacks"][0]["asr"]["ablated"]
    assert row["plain_base"] == attack["plain"]["base"] and row["plain_ablated"] == attack["plain"]["ablated"]
    md = (out / "report.md").read_text()
    assert "## Robustness (`--attacks`)" in md and f"| run | prompts | {row['budget']} |" in md
