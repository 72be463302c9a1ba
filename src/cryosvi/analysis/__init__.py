"""From posteriors to structures: ``cryosvi analyze``.

A posterior STAR of ``cryosvi infer`` gives every particle's conformational coordinates
(the amplitudes of the run's modes, ``cryosviModeAmplitude1..K``, and their posterior
stds). This package turns them into what a structural biologist works with:

* ``landscape``: the distribution of the particles along each coordinate, as the
  histogram of the posterior means and as the density that counts each particle's
  posterior width, and the bins along one coordinate;
* ``ensemble``: an atomic model per bin centre, every atom of the structure's chain moved
  as the reference's pseudo-atoms move (rigid blocks or per-residue displacements);
* ``subsets``: the particles of each bin as RELION 3.1 STAR (and cryoSPARC .cs) files;
* ``maps``: each bin reconstructed by RELION's ``relion_reconstruct`` and the maps'
  correlations;
* ``driver``: ``analyze()``, the checks before any work and the output folder.

It sits beside ``cryosvi.inference`` and ``cryosvi.training`` and imports neither.
"""
