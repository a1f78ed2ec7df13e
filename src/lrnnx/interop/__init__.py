"""Loading weights trained by other libraries into lrnnx models.

Each module here maps one library's checkpoint layout onto lrnnx modules, exactly (the same
function, not an approximation), and is tested by building the other library's model with
random weights, saving it, loading it with lrnnx and comparing outputs.  Nothing here imports
the other library at ``import lrnnx`` time.
"""
