"""The two colours of a project: a leaf module, so the command line's parser names them without loading config."""

COLOURS = ("blue", "green")
