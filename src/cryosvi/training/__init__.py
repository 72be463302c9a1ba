"""Training the guide: objectives, staged schedules, checkpoints, resume, logs.

Objectives (a schedule is a list of stages, each with one objective):

* ``sim`` -- simulation-based training (neural posterior estimation). Every step draws
  fresh (latents, image) pairs from the model itself (``cryosvi.model.sample_prior`` plus white
  noise of the run's noise std) and minimises ``-log q(z_true | x)``, the forward KL from
  the model's joint to the guide. It is mass-covering, cannot fall into pose local minima
  and never runs out of data; only the priors, optics, conditions (CTF estimates, optics
  groups, shifts) and noise level come from the particles, so an epoch is a fixed number
  of simulations (``cryosvi.config.SIM_EPOCH_SIZE``), not a pass over the particles.
* ``elbo`` -- the paper's objective: ``Trace_ELBO`` on the particles with ClippedAdam
  (``pyro.optim.clipped_adam.ClippedAdam``, the optimizer ``pyro.optim.ClippedAdam``
  wraps; one instance over all guide parameters is the same update as ``SVI.step``).
  The loss is reported per particle (the full-data ELBO divided by the number of
  particles). Sites without reparameterised samples get Pyro's score-function term.
* ``sim`` then ``elbo``: pre-training by simulation, fine-tuning on the particles.

Each stage lists the encoders it trains; the others are frozen (the paper's staged
schedule, ``data/schedule_paper.toml``).

Modules: ``schedule`` (stages, default and bundled schedules), ``objectives`` (the
losses), ``validation`` (a fixed simulated set and its metrics), ``setup`` (options,
particles -> the run's reference and guide config, resume and --init), ``loop`` (the
epochs, checkpoints and run.json), ``log`` (log.jsonl and loss.png), ``distributed``
(data-parallel training under torchrun: the processes, their shares of a batch, BatchNorm
over them). The run directory (``RUN/``: run.json, reference.npz, checkpoint.pt,
log.jsonl, loss.png) and its checkpoint are described in ``cryosvi.rundir``. Training never imports
``cryosvi.inference``.
"""
