-- The accept key, for both ways of showing suggestions: it accepts the suggestion on screen;
-- with none it does what the key did in that buffer before codelm mapped it (a completion
-- menu's Tab, a snippet jump: the user's own mapping, kept as a <Plug> mapping), or types it.
local M = {}

local DESC = 'codelm: accept'

--- Maps `key` in Insert mode in `bufnr`. `accept()` returns the keys that accept the
--- suggestion on screen, or nil when there is none.
function M.map_accept(bufnr, key, accept)
  local fallback = '<Plug>(codelm-key-before)'
  vim.api.nvim_buf_call(bufnr, function() -- (maparg and mapset see the current buffer's)
    local before = vim.fn.maparg(key, 'i', false, true)
    if before.desc == DESC then
      return -- a server that restarts attaches again: this mapping is ours, its <Plug> kept
    elseif before.lhs then
      before.lhs, before.lhsraw, before.lhsrawalt = fallback, vim.keycode(fallback), nil
      before.buffer = 1
      vim.fn.mapset(before)
    else
      vim.keymap.set('i', fallback, key, { buffer = bufnr })
    end
  end)
  -- An expression: the keys it gives go where the key was pressed, before any typed ahead
  -- (fed keys would land after them, as in a macro or fast typing). Remapped, so that the
  -- <Plug> mapping runs; the key itself only ever comes out of that one, unmapped.
  vim.keymap.set('i', key, function()
    return accept() or fallback
  end, { buffer = bufnr, expr = true, remap = true, desc = DESC })
end

return M
