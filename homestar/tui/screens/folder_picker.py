"""Picks a data folder (or file) from a directory tree; dismisses with its path or None."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Static


class _VisibleTree(DirectoryTree):
    """A directory tree without hidden (dot) entries."""

    def filter_paths(self, paths):
        return [path for path in paths if not path.name.startswith(".")]


class FolderPickerScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False), Binding("u", "use", "Use this", show=False)]

    def __init__(self, start: Path):
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box", classes="dialog") as box:
            box.border_title = "Training data"
            yield Static("Enter opens a folder; u (or the button) uses the highlighted one.", markup=False)
            yield _VisibleTree(self.start, id="picker-tree")
            yield Static(str(self.start), id="picker-current", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Use this", id="use", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one(DirectoryTree).focus()

    @property
    def highlighted(self) -> Path:
        node = self.query_one(DirectoryTree).cursor_node
        if node is not None and node.data is not None:
            return Path(node.data.path)
        return self.start

    def on_tree_node_highlighted(self, event) -> None:
        self.query_one("#picker-current", Static).update(str(self.highlighted))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "use":
            self.action_use()
        else:
            self.dismiss(None)

    def action_use(self) -> None:
        self.dismiss(self.highlighted)

    def action_cancel(self) -> None:
        self.dismiss(None)
