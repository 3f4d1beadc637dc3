"""Exemplar-guided active learning on word-sense pools and skewed digits, every method x seed x pool:

  python main.py --config=configs/egal_wsd.py --workdir=workdir_egal [--config.num_seeds=100]

Words in context are embedded by Schütze's context vectors over the bundled corpus (no training run
needed; `active_learning.context_vectors`), or by a Jamba / SenseBERT checkpoint (config.encoder).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "egal_wsd"  # runs tasks/egal_wsd.py
    c.seed = 0  # pool draws and the seeds' keys
    c.num_seeds = 100  # labelling runs per method and pool (one vmapped program)
    c.encoder = "context"  # "context" (corpus context vectors), "jamba" (a jamba_lm workdir's hidden states) or
    # "sensebert" (a sensebert_pretrain workdir); only the context vectors separate these senses well (BENCHMARKS)
    c.context_dim = 64  # context: dimensions of the word vectors
    c.encoder_checkpoint = "workdir"  # jamba / sensebert: the encoder's training workdir
    c.encoder_layer = 4  # jamba: the layer whose output embeds the target word (-1: the last)
    c.pools = ("personmusic", "familyriver", "citydisease", "languagefood")  # pseudo-words (data/egal_pools)
    c.skews = (4, 8)  # common : second-sense examples in each pseudo-word's pool (20% and 11%: both common)
    c.absent_senses = 2  # senses of another pseudo-word added as classes with an exemplar and no examples
    c.min_all_labels_accuracy = 0.85  # pools where a classifier fitted on every label does worse are skipped:
    # features that do not separate the classes cannot show any method's effect
    c.include_digits = True  # also scikit-learn's digits 0-4, with 5-9 as absent classes
    c.methods = ()  # () = every method: egal, egal_nostop, egal_thompson, egal_eps, random, least_confidence,
    # entropy, guided

    al = ml_collections.ConfigDict()  # the labelling runs (active_learning.Settings and the proposal)
    al.batch = 40  # labels per round
    al.rounds = 10  # rounds per run (budget: batch x rounds)
    al.threshold = 0.1  # a class is common above this frequency (the authors'); every sense present is, the
    # absent ones are to be proven rare: with no hit that takes n draws where
    # max_weight x 7 ln(2n) / (3 (n - 1)) < threshold, about 300 at max_weight 2 (BENCHMARKS `egal`)
    al.epsilon = 0.1  # the epsilon-greedy variant's exploration rate
    al.thompson_scale = 10.0  # egal_thompson: sharpness of its uncertainty sampling
    al.fit_steps = 40  # L-BFGS steps per refit of the logistic regression, at most ...
    al.fit_tol = 1e-4  # ... fewer once max |gradient| <= fit_tol x labels (scikit-learn's tol; 0: all)
    al.max_draws = 4096  # proposal draws per search label before a random unlabelled point
    al.ess_target = 0.6  # proposal width: smallest sigma keeping this effective-sample-size ratio
    al.uniform_mix = 0.5  # defensive mixture with the uniform distribution: caps the weights at 2 (at 0.1,
    # the authors' scale, at 10, and proving a class absent takes ~2,000 draws, five times the budget)
    al.min_prob = 1e-6  # floor of the proposal (the authors')
    c.al = al
    return c
