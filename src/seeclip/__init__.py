"""SeeCLIP: CLIP that recognises known classes under domain shift and rejects unknown ones."""

__version__ = "0.1.0"


def load(run_dir):
    """A trained run folder ready to predict new images: ``seeclip.load(dir).predict(images)``
    (see :mod:`seeclip.predict`)."""
    from seeclip.predict import load as _load

    return _load(run_dir)


__all__ = ["__version__", "load"]
