"""The vijax version (a module of its own: checkpoints record it without importing the
package)."""

__version__ = "0.1.0"
