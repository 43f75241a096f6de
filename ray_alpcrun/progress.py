"""The optional progress bar of ``Session.run``/``submit`` and ``RayPool.map``.

A tqdm bar: text in a terminal, an ipywidgets bar in Jupyter (``tqdm.auto``). A
widget's output also carries a text fallback, what GitHub and ``nbconvert --to
markdown`` show; tqdm writes it once, when the bar appears (``0%| | 0/16``).
Here the widget is displayed under a display id and displayed again when the bar
closes, so a saved notebook's text shows the finished bar (``100%|#####| 16/16``);
its widget state (saved by nbclient/nbconvert) holds the final value too.
"""

from __future__ import annotations

import functools
import sys
from typing import Any


def progress_bar(total: int | None, desc: str | None = None) -> Any:
    """A tqdm bar counting tasks; ``close()`` it when done."""
    from tqdm.auto import tqdm  # only when asked for: tqdm.auto probes for Jupyter

    notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto only in Jupyter
    if notebook is None or not issubclass(tqdm, notebook.tqdm_notebook):
        return tqdm(total=total, unit="task", desc=desc)
    return _saved_bar_class(tqdm)(total=total, unit="task", desc=desc)


@functools.cache
def _saved_bar_class(base: Any) -> Any:
    from IPython.display import display

    class SavedBar(base):  # type: ignore[misc, valid-type]
        """A notebook bar whose output is re-displayed, finished, on close."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, display=False, **kwargs)
            self._handle = display(self.container, display_id=True)  # type: ignore[no-untyped-call]
            self.displayed = True

        def close(self) -> None:
            super().close()
            # close() runs again from __del__: update the saved output once.
            handle, self._handle = getattr(self, "_handle", None), None
            if handle is not None:
                handle.update(self.container)

    return SavedBar
