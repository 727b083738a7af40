"""The Google Sheets worker: `sheets.update` jobs as few, rate-limited Sheets v4 calls."""

from formcraftd.workers.sheets.handler import SheetsHandler

__all__ = ["SheetsHandler"]
