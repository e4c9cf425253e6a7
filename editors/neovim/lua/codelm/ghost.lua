-- Inline suggestions for Neovim 0.11, which has no vim.lsp.inline_completion: after each change
-- in Insert mode (debounced) ask codelm-lsp for textDocument/inlineCompletion and show the first
-- item as virtual text at the cursor; the accept key inserts it and runs its command.
local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('codelm.ghost')
local AUTOMATIC, INVOKED = 2, 1 -- lsp.InlineCompletionTriggerKind

api.nvim_set_hl(0, 'CodelmSuggestion', { link = 'Comment', default = true })

---@type table<integer, {client: vim.lsp.Client, timer: uv.uv_timer_t, request?: integer, item?: table, at?: integer[], tick?: integer}>
local buffers = {}

local function lines_of(text)
  return vim.split(text, '\n', { plain = true })
end

local function byte_col(bufnr, position, encoding)
  local line = api.nvim_buf_get_lines(bufnr, position.line, position.line + 1, false)[1] or ''
  return vim.str_byteindex(line, encoding, position.character, false)
end

--- The shown part of `item`: its text after what is already typed between its start and the cursor.
local function visible_text(bufnr, item, row, col)
  if item.start[1] ~= row or item.start[2] > col then
    return nil
  end
  local typed = api.nvim_buf_get_text(bufnr, row, item.start[2], row, col, {})[1]
  if item.text:sub(1, #typed) ~= typed then
    return nil
  end
  return item.text:sub(#typed + 1)
end

local function clear(bufnr)
  local state = buffers[bufnr]
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  if state then
    state.item, state.at = nil, nil
  end
end

local function show(bufnr, item)
  local row, col = unpack(api.nvim_win_get_cursor(0))
  row = row - 1
  local text = visible_text(bufnr, item, row, col)
  if not text or text == '' then
    return
  end
  local lines = lines_of(text)
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], 'CodelmSuggestion' } }
  end
  api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = { { lines[1], 'CodelmSuggestion' } },
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
  })
  buffers[bufnr].item, buffers[bufnr].at = item, { row, col }
  buffers[bufnr].tick = api.nvim_buf_get_changedtick(bufnr)
end

local function to_item(bufnr, raw, encoding)
  local text = type(raw.insertText) == 'table' and raw.insertText.value or raw.insertText
  -- The server answers with the document's line endings (CRLF in a fileformat=dos buffer);
  -- buffer lines never hold them: kept, each would end its line with a ^M.
  text = text:gsub('\r\n?', '\n')
  local range = raw.range
  if not range then
    local row, col = unpack(api.nvim_win_get_cursor(0))
    return { text = text, start = { row - 1, col }, finish = { row - 1, col }, command = raw.command }
  end
  return {
    text = text,
    start = { range.start.line, byte_col(bufnr, range.start, encoding) },
    finish = { range['end'].line, byte_col(bufnr, range['end'], encoding) },
    command = raw.command,
  }
end

local function cancel(state)
  state.timer:stop()
  if state.request then
    state.client:cancel_request(state.request)
    state.request = nil
  end
end

--- Ask for a suggestion at the cursor now (trigger_kind: 1 invoked, 2 automatic).
function M.request(bufnr, trigger_kind)
  local state = buffers[bufnr]
  if not state or api.nvim_get_current_buf() ~= bufnr then
    return
  end
  cancel(state)
  local client, tick = state.client, api.nvim_buf_get_changedtick(bufnr)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = trigger_kind }
  local _, id = client:request('textDocument/inlineCompletion', params, function(err, result)
    state.request = nil
    if err or not result or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    local raw = (result.items or result)[1]
    if raw and api.nvim_get_mode().mode:sub(1, 1) == 'i' then
      clear(bufnr)
      show(bufnr, to_item(bufnr, raw, client.offset_encoding))
    end
  end, bufnr)
  state.request = id
end

--- Insert the suggestion on screen and run its command (codelm.accept); false if there is none.
function M.accept(bufnr)
  local state = buffers[bufnr]
  local item = state and state.item
  if not item then
    return false
  end
  clear(bufnr)
  local lines = lines_of(item.text)
  api.nvim_buf_set_text(bufnr, item.start[1], item.start[2], item.finish[1], item.finish[2], lines)
  local row = item.start[1] + #lines
  local col = (#lines == 1 and item.start[2] or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { row, col })
  if item.command then
    state.client:exec_cmd(item.command, { bufnr = bufnr })
  end
  return true
end

--- Hide the suggestion; tell the server it was dismissed (codelm.dismiss).
function M.dismiss(bufnr)
  local state = buffers[bufnr]
  if state and state.item then
    state.client:exec_cmd({ title = 'dismiss', command = 'codelm.dismiss', arguments = {} }, { bufnr = bufnr })
  end
  clear(bufnr)
end

local function map_keys(bufnr, keys)
  if keys.accept then
    require('codelm.keys').map_accept(bufnr, keys.accept, function()
      local state = buffers[bufnr]
      if state and state.item then
        return ('<Cmd>lua require("codelm.ghost").accept(%d)<CR>'):format(bufnr)
      end
    end)
  end
  if keys.trigger then
    vim.keymap.set('i', keys.trigger, function()
      M.request(bufnr, INVOKED)
    end, { buffer = bufnr, desc = 'codelm: suggest' })
  end
end

function M.attach(client, bufnr, config)
  if buffers[bufnr] then
    return
  end
  local state = { client = client, timer = assert(vim.uv.new_timer()) }
  buffers[bufnr] = state
  local group = api.nvim_create_augroup('codelm.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd('TextChangedI', {
    group = group,
    buffer = bufnr,
    callback = function()
      clear(bufnr)
      cancel(state)
      state.timer:start(config.debounce_ms, 0, vim.schedule_wrap(function()
        M.request(bufnr, AUTOMATIC)
      end))
    end,
  })
  api.nvim_create_autocmd('CursorMovedI', {
    group = group,
    buffer = bufnr,
    callback = function()
      local row, col = unpack(api.nvim_win_get_cursor(0))
      if state.at and (state.at[1] ~= row - 1 or state.at[2] ~= col) then
        if api.nvim_buf_get_changedtick(bufnr) ~= state.tick then
          clear(bufnr) -- typed (maybe the suggestion itself): TextChangedI asks again
        else
          M.dismiss(bufnr)
        end
      end
    end,
  })
  -- Leaving Insert mode by any key: InsertLeave misses <C-c>.
  api.nvim_create_autocmd('ModeChanged', {
    group = group,
    buffer = bufnr,
    callback = function()
      if vim.v.event.old_mode:sub(1, 1) == 'i' and vim.v.event.new_mode:sub(1, 1) ~= 'i' then
        cancel(state)
        M.dismiss(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd('BufLeave', {
    group = group,
    buffer = bufnr,
    callback = function()
      cancel(state)
      M.dismiss(bufnr)
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.data.client_id == client.id then
        cancel(state)
        clear(bufnr)
        state.timer:close()
        buffers[bufnr] = nil
        api.nvim_del_augroup_by_id(group)
      end
    end,
  })
  map_keys(bufnr, config.keys)
end

return M
