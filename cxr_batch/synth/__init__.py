"""The built-in example archive: procedural chest phantoms with planted opacities."""
