"""The osora application: training, evaluation, the demo and exports on the command line.

The library (``osora``) knows nothing about this package; this package only imports the library.
"""
