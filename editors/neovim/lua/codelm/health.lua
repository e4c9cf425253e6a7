-- :checkhealth codelm: the Neovim version, the codelm-lsp command, the server's state.
local M = {}

function M.check()
  local health = vim.health
  local codelm = require('codelm')
  health.start('codelm')
  if vim.fn.has('nvim-0.11') == 1 then
    local how = vim.lsp.inline_completion and 'built-in vim.lsp.inline_completion'
      or "codelm's own virtual text"
    health.ok(('Neovim %s: suggestions drawn by %s'):format(tostring(vim.version()), how))
  else
    health.error('Neovim 0.11 or newer is needed')
  end
  local config = vim.lsp.config and vim.lsp.config.codelm
  if not config or not config.cmd then
    health.warn("require('codelm').setup() has not run (or failed: see :messages)")
    return
  end
  local cmd = config.cmd
  if type(cmd) == 'table' and vim.fn.executable(cmd[1]) == 1 then
    health.ok('codelm-lsp: ' .. table.concat(cmd, ' '))
  else
    health.error('cannot run ' .. vim.inspect(cmd), codelm.cmd_hint)
  end
  local state, message = codelm.status()
  local report = (state == 'ready' or state == 'busy') and health.ok
    or (state == 'error' and health.error)
    or health.info
  report(('server state: %s %s'):format(state, message))
end

return M
