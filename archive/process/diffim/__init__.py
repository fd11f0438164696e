"""Difference imaging: a calexp minus its template, by Alard-Lupton PSF matching or ZOGY,
and the DIASources found on the difference.

:mod:`.template` puts the template (from every tile the calexp overlaps) on the calexp's
grid; :mod:`.alard_lupton` and :mod:`.zogy` subtract; :mod:`.detection` finds and measures
DIASources (positive and negative, dipoles).  Both subtraction methods return a
:class:`.result.DifferenceResult`.
"""
