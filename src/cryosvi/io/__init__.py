"""File formats. ``cryosvi.io.read_particles`` (RELION STAR of any version, cryoSPARC .cs)
is the one entry point for particle data; it is imported on first use so that
``cryosvi.io.atomic`` stays light."""


def __getattr__(name):
    if name in ("read_particles", "write_particles", "ParticleSet"):
        from cryosvi.io import particles

        return getattr(particles, name)
    raise AttributeError(f"module 'cryosvi.io' has no attribute {name!r}")
