"use strict";
// What changed between two versions of a section: the longest common subsequence of their
// words (spaces kept as tokens, so the text reads as written), shown as <del> and <ins> built
// with textContent. Past MAX_CELLS it compares lines instead, so a long section cannot freeze
// the tab, and past that again it shows the changed middle as removed and added whole.
const textDiff = (() => {
  const MAX_CELLS = 4_000_000;

  function split(text, byLine) {
    return byLine ? text.split(/(?<=\n)/) : text.split(/(\s+)/).filter((t) => t !== "");
  }

  function diff(before, after) {
    let [a, b] = [split(before, false), split(after, false)];
    if (a.length * b.length > MAX_CELLS) [a, b] = [split(before, true), split(after, true)];
    const parts = [];
    const push = (kind, text) => {
      const last = parts[parts.length - 1];
      if (last && last.kind === kind) last.text += text; else parts.push({ kind, text });
    };
    let head = 0;
    while (head < a.length && head < b.length && a[head] === b[head]) head += 1;
    let [endA, endB] = [a.length, b.length];
    while (endA > head && endB > head && a[endA - 1] === b[endB - 1]) { endA -= 1; endB -= 1; }
    a.slice(0, head).forEach((t) => push("same", t));
    const [x, y] = [a.slice(head, endA), b.slice(head, endB)];
    const [n, m] = [x.length, y.length];
    if (n * m > MAX_CELLS) {
      x.forEach((t) => push("del", t));
      y.forEach((t) => push("ins", t));
    } else {
      // lcs[i][j]: the longest common run of x[i..] and y[j..]
      const w = m + 1;
      const lcs = new Uint32Array((n + 1) * w);
      for (let i = n - 1; i >= 0; i -= 1) {
        for (let j = m - 1; j >= 0; j -= 1) {
          lcs[i * w + j] = x[i] === y[j] ? lcs[(i + 1) * w + j + 1] + 1 : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
        }
      }
      let [i, j] = [0, 0];
      while (i < n && j < m) {
        if (x[i] === y[j]) { push("same", x[i]); i += 1; j += 1; }
        else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) { push("del", x[i]); i += 1; }
        else { push("ins", y[j]); j += 1; }
      }
      x.slice(i).forEach((t) => push("del", t));
      y.slice(j).forEach((t) => push("ins", t));
    }
    a.slice(endA).forEach((t) => push("same", t));
    return parts;
  }

  function render(parts, into) {
    into.replaceChildren(...parts.map(({ kind, text }) => {
      const el = document.createElement(kind === "same" ? "span" : kind);
      el.textContent = text;
      return el;
    }));
  }

  return { diff, render };
})();
