"""The built-in example archive: procedural chest phantoms with planted opacities."""

# The kinds of training task ``make_archive`` writes (synth/texture.py); here, so the CLI can name them
# without importing numpy.
FAMILIES = ("phantom", "texture", "film")
