"""SeeCLIP: CLIP that recognises known classes under domain shift and rejects unknown ones."""

__version__ = "0.1.0"
