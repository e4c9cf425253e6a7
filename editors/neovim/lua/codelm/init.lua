-- codelm for Neovim: starts codelm-lsp and shows its inline suggestions. Editors stay thin:
-- every completion decision is the server's. Neovim 0.12+ renders them with the built-in
-- vim.lsp.inline_completion; 0.11 with codelm.ghost.
local M = {}

local defaults = {
  cmd = nil, -- default: the nearest .venv/bin/codelm-lsp above the working directory, else PATH
  filetypes = nil, -- nil: every file type
  settings = {}, -- codelm-lsp options (initializationOptions, camelCase; docs/lsp.md)
  keys = { accept = '<Tab>', trigger = '<M-\\>' },
  debounce_ms = 30, -- 0.11 only: wait before asking (the server adds its own adaptive debounce)
}

M.config = vim.deepcopy(defaults)
M.state = { state = 'loading', message = '' }

--- The codelm-lsp command: a project's virtual environment first, as the VS Code extension does.
local function server_cmd()
  local name = vim.fn.has('win32') == 1 and '.venv/Scripts/codelm-lsp.exe' or '.venv/bin/codelm-lsp'
  for dir in vim.fs.parents(vim.fn.getcwd() .. '/.') do
    local candidate = dir .. '/' .. name
    if vim.fn.executable(candidate) == 1 then
      return { candidate, '--stdio' }
    end
  end
  return { 'codelm-lsp', '--stdio' }
end

--- The settings as initializationOptions. Neovim encodes an empty Lua table as a JSON array,
--- which the server cannot take for its options object: an empty one goes as `{}`.
local function init_options(settings)
  if type(settings) == 'table' and next(settings) == nil then
    return vim.empty_dict()
  end
  return settings
end

local function on_status(_, result)
  M.state = { state = result.state, message = result.message or '' }
  vim.api.nvim_exec_autocmds('User', { pattern = 'CodelmStatus', modeline = false })
end

local function on_attach(client, bufnr)
  local keys = M.config.keys
  if vim.lsp.inline_completion then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    vim.keymap.set('i', keys.accept, function()
      if not vim.lsp.inline_completion.get() then
        return keys.accept
      end
    end, { buffer = bufnr, expr = true, desc = 'codelm: accept' })
    vim.keymap.set('i', keys.trigger, vim.lsp.inline_completion.get, { buffer = bufnr, desc = 'codelm: suggest' })
  else
    require('codelm.ghost').attach(client, bufnr, M.config)
  end
end

--- Starts codelm-lsp for matching buffers. `opts` overrides the defaults above.
function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  vim.lsp.config('codelm', {
    cmd = M.config.cmd or server_cmd(),
    filetypes = M.config.filetypes,
    root_markers = { '.git' },
    init_options = init_options(M.config.settings),
    handlers = { ['codelm/status'] = on_status },
    on_attach = on_attach,
  })
  vim.lsp.enable('codelm')
end

--- The last `codelm/status` {state, message}: loading | ready | busy | error | disabled.
function M.status()
  return M.state.state, M.state.message
end

return M
