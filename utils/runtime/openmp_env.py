"""OpenMP's spin-wait, bounded before PyTorch loads OpenMP: import this module before `import torch`.

PyTorch's CPU kernels split work over OpenMP threads; a thread that finishes its share spins, waiting for the
others, before it sleeps. GNU OpenMP (the one PyTorch's pip wheels use) spins 300,000 times by default: on a
machine whose cores are shared with other jobs, threads that spin while their partner thread is descheduled
burn the time the partner needs, and training slows down several times over. 10,000 spins cost nothing
measurable on an idle machine and keep most of the speed on a busy one (README.md, "Performance": cpu_small,
2 cores). A value the user set is kept; other OpenMP runtimes ignore the variable.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
