"""Attacks on ablated models: can the concept come back? (`ablate attack`, docs/robustness.md)

* `prompts`: paraphrases, synonyms, misspellings, descriptions, other languages (`prompt_sets/`);
* `text-search`: Ring-A-Bell-style search on the text encoder only;
* `prefix`: UnlearnDiffAtk-style prefix embeddings optimised through the ablated UNet;
* `inversion`: textual inversion through the ablated model (Pham et al. 2023);
* `relearn`: fine-tuning the ablated group on a few target images (concept resurgence);
The robust-training adversary the trainer uses is `ablation.adversary` (re-exported here).
"""

from ablation.adversary import AdversarialEmbeddings, adversarial_target_embeddings
from ablation.attacks.registry import ATTACKS
from ablation.attacks.runner import AttackSettings, run_attacks

__all__ = ["ATTACKS", "AttackSettings", "run_attacks", "AdversarialEmbeddings", "adversarial_target_embeddings"]
