"""Exemplar-guided active learning on word-sense pools and skewed digits, every method x seed x pool:

  python main.py --config=configs/egal_wsd.py --workdir=workdir_egal [--config.num_seeds=100]

The encoder is the quick start's tiny Jamba (`python main.py` writes workdir/) unless set otherwise.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "egal_wsd"  # runs tasks/egal_wsd.py
    c.seed = 0  # pool draws and the seeds' keys
    c.num_seeds = 100  # labelling runs per method and pool (one vmapped program)
    c.encoder = "jamba"  # "jamba" (a jamba_lm workdir's hidden states) or "sensebert" (a sensebert_pretrain workdir)
    c.encoder_checkpoint = "workdir"  # the encoder's training workdir
    c.encoder_layer = 4  # jamba: the layer whose output embeds the target word (-1: the last)
    c.pools = ("personmusic", "familyriver", "citydisease", "languagefood")  # pseudo-words (data/egal_pools)
    c.skews = (100, 10)  # common : rare examples in each pseudo-word's pool
    c.include_digits = True  # also scikit-learn's digits, class c at frequency 0.5^c
    c.methods = ()  # () = every method: egal, egal_thompson, egal_eps, random, least_confidence, entropy, guided

    al = ml_collections.ConfigDict()  # the labelling runs (active_learning.Settings and the proposal)
    al.batch = 20  # labels per round
    al.rounds = 10  # rounds per run (budget: batch x rounds)
    al.threshold = 0.05  # a class is common above this frequency: the 1:10 pools' minority sense (9%) is
    # common (to be found), the 1:100 pools' (1%) rare (to be proven rare and left); the authors used 0.1
    al.epsilon = 0.1  # the epsilon-greedy variant's exploration rate
    al.thompson_scale = 10.0  # egal_thompson: sharpness of its uncertainty sampling
    al.fit_steps = 40  # L-BFGS steps per refit of the logistic regression, at most ...
    al.fit_tol = 1e-4  # ... fewer once max |gradient| <= fit_tol x labels (scikit-learn's tol; 0: all)
    al.max_draws = 4096  # proposal draws per search label before a random unlabelled point
    al.ess_target = 0.25  # proposal width: smallest sigma keeping this effective-sample-size ratio
    al.uniform_mix = 0.1  # defensive mixture with the uniform distribution (caps weights at 10)
    al.min_prob = 1e-6  # floor of the proposal (the authors')
    c.al = al
    return c
