"use strict";
// Section text comes from a model or a person, so none of it may run: it is rendered by
// markdown-it 15.0.3 (vendor/markdown-it.min.js is dist/browser/markdown-it.umd.min.js of
// `npm pack markdown-it@15.0.3`, unchanged; MIT, its LICENSE beside it) with raw HTML off (every tag is escaped as text), links only to
// http(s) and mailto (no javascript: or data:), and no images (they would load from elsewhere).
const markdown = (() => {
  const md = window.markdownit({ html: false, linkify: false, typographer: false });
  md.disable(["image"]);
  md.validateLink = (url) => /^(https?:|mailto:)/i.test(url.trim());
  const linkOpen = md.renderer.rules.link_open
    || ((tokens, idx, options, env, self) => self.renderToken(tokens, idx, options));
  md.renderer.rules.link_open = (tokens, idx, options, env, self) => {
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow");
    tokens[idx].attrSet("target", "_blank");
    return linkOpen(tokens, idx, options, env, self);
  };
  return { render: (source, into) => { into.innerHTML = md.render(source); } };
})();
