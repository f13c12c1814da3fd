package org.minicpmvedge.core

import org.junit.jupiter.api.Test
import kotlin.test.assertContentEquals
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertTrue

/** Unit tests of the core that need no kit: JSON, EXIF parsing, the log, prompt segments, manifest, device report. */
class CoreUnitTest {
    // ---- JSON ------------------------------------------------------------------------------------

    @Test
    fun jsonCanonicalMatchesPython() {
        // json.dumps(doc, indent=2) of a document with escapes, non-ASCII, floats and nesting
        val pythonText =
            """{
  "z": [1, 2.5, -0.0, 1e-05, 1.5e+300, true, null],
  "a": "tab\tnl\nq\"bs\\ ctl\u0001 del\u007f \u00e9 \u4e2d \ud83d\ude00",
  "m": {"b": {}, "a": []},
  "\u00e9": 1,
  "E": 2
}"""
        // json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        val want =
            """{"E":2,"a":"tab\tnl\nq\"bs\\ ctl\u0001 del${'\u007f'} é 中 😀",""" +
                """"m":{"a":[],"b":{}},"z":[1,2.5,-0.0,1e-05,1.5e+300,true,null],"é":1}"""
        val doc = Json.parse(pythonText)
        assertEquals(want, Json.canonical(doc))
        assertEquals(doc, Json.parse(Json.write(doc)))
        assertEquals(doc, Json.parse(Json.writePretty(doc)))
        assertEquals("tab\tnl\nq\"bs\\ ctl\u0001 del\u007f é 中 😀", doc.obj()["a"]!!.str())
    }

    @Test
    fun jsonRejectsMalformed() {
        for (bad in listOf(
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "\"\\x\"",
            "\"a\nb\"",
            "{\"a\":1 \"b\":2}",
            "[1] 2",
            "nul",
            "{\"a\":1,\"a\":2}",
        )) {
            assertFailsWith<JsonException>("should refuse: $bad") { Json.parse(bad) }
        }
        assertFailsWith<JsonException> { Json.parse(byteArrayOf(0x22, 0xff.toByte(), 0x22)) }
        assertEquals(JsonNumber("-1.5E+3"), Json.parse(" -1.5E+3 "))
        assertEquals(-1500.0, Json.parse("-1.5E+3").double())
        assertFailsWith<JsonException> { Json.parse("1.5").int() }
    }

    // ---- EXIF ------------------------------------------------------------------------------------

    /** A JPEG header with an APP0, then an APP1 Exif segment whose IFD0 holds Orientation = [value]. */
    private fun jpegWithOrientation(
        value: Int,
        little: Boolean,
        type: Int = 3,
    ): ByteArray {
        fun u16(v: Int) = if (little) listOf(v and 0xff, v shr 8) else listOf(v shr 8, v and 0xff)

        fun u32(v: Int) = if (little) u16(v and 0xffff) + u16(v ushr 16) else u16(v ushr 16) + u16(v and 0xffff)
        val tiff =
            (if (little) listOf(0x49, 0x49) else listOf(0x4d, 0x4d)) + u16(42) + u32(8) +
                u16(2) + // two entries: ImageWidth, then Orientation
                u16(0x0100) + u16(3) + u32(1) + u16(640) + u16(0) +
                u16(0x0112) + u16(type) + u32(1) + u16(value) + u16(0) +
                u32(0)
        val exif = listOf(0x45, 0x78, 0x69, 0x66, 0, 0) + tiff
        val app0 = listOf(0xff, 0xe0, 0, 16) + "JFIF".map { it.code } + List(10) { 0 }
        val app1 = listOf(0xff, 0xe1, (exif.size + 2) shr 8, (exif.size + 2) and 0xff) + exif
        return (listOf(0xff, 0xd8) + app0 + app1 + listOf(0xff, 0xda, 0, 2, 0xff, 0xd9)).map { it.toByte() }.toByteArray()
    }

    @Test
    fun exifOrientationBothByteOrders() {
        for (o in 1..8) {
            assertEquals(o, Exif.jpegOrientation(jpegWithOrientation(o, little = true)), "II orientation $o")
            assertEquals(o, Exif.jpegOrientation(jpegWithOrientation(o, little = false)), "MM orientation $o")
        }
        assertEquals(0, Exif.jpegOrientation(jpegWithOrientation(9, little = true)), "out of range")
        assertEquals(0, Exif.jpegOrientation(jpegWithOrientation(6, little = true, type = 4)), "not a SHORT")
        val good = jpegWithOrientation(6, little = false)
        assertEquals(0, Exif.jpegOrientation(good.copyOf(30)), "truncated")
        assertEquals(0, Exif.jpegOrientation(byteArrayOf(0x89.toByte(), 0x50, 0x4e, 0x47)), "not a JPEG")
        val noExif = good.copyOf().also { it[24] = 0x46 } // "Exif" -> "Fxif"
        assertEquals(0, Exif.jpegOrientation(noExif))
    }

    @Test
    fun applyOrientationAllEight() {
        // a 3x2 image (w 3, h 2) whose pixel values are 1..6 in reading order
        val img = ImagePixels(3, 2, ByteArray(18) { (it / 3 + 1).toByte() })

        fun grid(p: ImagePixels) = List(p.height) { y -> List(p.width) { x -> p.rgb[(y * p.width + x) * 3].toInt() } }
        val want =
            mapOf(
                1 to listOf(listOf(1, 2, 3), listOf(4, 5, 6)),
                2 to listOf(listOf(3, 2, 1), listOf(6, 5, 4)),
                3 to listOf(listOf(6, 5, 4), listOf(3, 2, 1)),
                4 to listOf(listOf(4, 5, 6), listOf(1, 2, 3)),
                5 to listOf(listOf(1, 4), listOf(2, 5), listOf(3, 6)),
                6 to listOf(listOf(4, 1), listOf(5, 2), listOf(6, 3)),
                7 to listOf(listOf(6, 3), listOf(5, 2), listOf(4, 1)),
                8 to listOf(listOf(3, 6), listOf(2, 5), listOf(1, 4)),
            )
        for ((o, g) in want) assertEquals(g, grid(Exif.applyOrientation(img, o)), "orientation $o")
    }

    // ---- the correctly rounded log ----------------------------------------------------------------

    @Test
    fun logMatchesGlibcOnGridRatios() {
        // Python math.log (glibc, correctly rounded) of every cols/rows of grids up to 17 slices, and of a few image ratios
        val golden =
            "1/17=-2.833213344056216;1/16=-2.772588722239781;1/15=-2.70805020110221;1/14=-2.639057329615259;" +
                "1/13=-2.5649493574615367;1/12=-2.4849066497880004;1/11=-2.3978952727983707;1/10=-2.3025850929940455;" +
                "1/9=-2.1972245773362196;1/8=-2.0794415416798357;1/7=-1.9459101490553135;1/6=-1.791759469228055;" +
                "1/5=-1.6094379124341003;1/4=-1.3862943611198906;2/7=-1.252762968495368;1/3=-1.0986122886681098;" +
                "2/5=-0.916290731874155;1/2=-0.6931471805599453;3/5=-0.5108256237659907;2/3=-0.40546510810816444;" +
                "3/4=-0.2876820724517809;1/1=0.0;4/3=0.28768207245178085;3/2=0.4054651081081644;5/3=0.5108256237659907;" +
                "2/1=0.6931471805599453;5/2=0.9162907318741551;3/1=1.0986122886681098;7/2=1.252762968495368;" +
                "4/1=1.3862943611198906;5/1=1.6094379124341003;6/1=1.791759469228055;7/1=1.9459101490553132;" +
                "8/1=2.0794415416798357;9/1=2.1972245773362196;10/1=2.302585092994046;11/1=2.3978952727983707;" +
                "12/1=2.4849066497880004;13/1=2.5649493574615367;14/1=2.6390573296152584;15/1=2.70805020110221;" +
                "16/1=2.772588722239781;17/1=2.833213344056216;333/217=0.42824513643998424;900/120=2.0149030205422647;" +
                "100/700=-1.9459101490553135;3/5=-0.5108256237659907;4032/3024=0.28768207245178085"
        for (entry in golden.split(";")) {
            val (ratio, value) = entry.split("=")
            val (a, b) = ratio.split("/").map { it.toDouble() }
            assertEquals(value.toDouble(), CorrectLog.log(a / b), "log($ratio)")
        }
        val rnd = java.util.Random(7)
        repeat(2000) {
            val x = Math.exp(rnd.nextGaussian() * 20)
            assertTrue(Math.abs(CorrectLog.log(x) - StrictMath.log(x)) <= Math.ulp(StrictMath.log(x)), "log($x)")
        }
        assertEquals(Math.log(Double.MIN_VALUE), CorrectLog.log(Double.MIN_VALUE), 1e-12)
    }

    @Test
    fun gridsMatchPython() {
        // edge_runtime get_sliced_grid((h, w), max_slice_nums, scale_resolution) on 3:1, 1:3, 2:1, 9:1, ... images
        val text =
            javaClass
                .getResourceAsStream("/grids-python.txt")!!
                .readBytes()
                .toString(Charsets.UTF_8)
                .trim()
        val cases = text.split(";")
        assertEquals(275, cases.size)
        for (c in cases) {
            val (args, want) = c.split("=")
            val (h, w, m, s) = args.split(",").map { it.toInt() }
            val got = Slicing.slicedGrid(h, w, m, s)
            assertEquals(want, if (got == null) "-" else "${got.h}x${got.w}", "grid of $args")
        }
    }

    // ---- resize ------------------------------------------------------------------------------------

    @Test
    fun resizeIdentityAndConstant() {
        val img = ImagePixels(5, 4, ByteArray(60) { (it * 37).toByte() })
        assertContentEquals(img.rgb, img.resized(5, 4).rgb)
        val flat = ImagePixels(7, 3, ByteArray(63) { 200.toByte() })
        for ((w, h) in listOf(14 to 6, 3 to 2, 7 to 9, 20 to 1)) {
            assertTrue(flat.resized(w, h).rgb.all { it == 200.toByte() }, "a constant image stays constant at ${w}x$h")
        }
    }

    @Test
    fun chwLayoutAndCrop() {
        // 2x2 image, pixel (x, y) = (10y + x, 100 + 10y + x, 200 + 10y + x)
        val img = ImagePixels(2, 2, ByteArray(12) { i -> (100 * (i % 3) + 10 * (i / 6) + (i / 3) % 2).toByte() })
        assertEquals(listOf(0, 1, 10, 11, 100, 101, 110, 111, 200, 201, 210, 211), img.toChwInts().toList())
        assertEquals(listOf(1, 101, 201, 11, 111, 211), img.crop(1, 0, 1, 2).rgb.map { it.toInt() and 0xff })
        assertEquals(listOf(0xff, 0x12, 0x34), ImagePixels.fromArgb(1, 1, intArrayOf(0x80ff1234.toInt())).rgb.map { it.toInt() and 0xff })
    }

    // ---- prompt --------------------------------------------------------------------------------------

    @Test
    fun promptSegmentsAndRefusals() {
        val b = PromptBuilder(ChatFormat.minicpmV46())
        val one = ImageLayout(2, Size2(2, 1), listOf(1, 3))
        val layout = b.build("  Hi?\n", listOf(one)) // the content is trimmed as a whole: images first, so only the end
        assertEquals(
            listOf(
                PromptSegment.Text("<|im_start|>user\n<image_id>0</image_id><image>"),
                PromptSegment.Slice(0, 0, 2),
                PromptSegment.Text("</image><slice>"),
                PromptSegment.Slice(0, 1, 1),
                PromptSegment.Text("</slice>\n<slice>"),
                PromptSegment.Slice(0, 2, 3),
                PromptSegment.Text("</slice>  Hi?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            ),
            layout.segments,
        )
        assertEquals(
            "<|im_start|>user\n<image_id>0</image_id><image><|image_pad|><|image_pad|></image><slice><|image_pad|></slice>\n" +
                "<slice><|image_pad|><|image_pad|><|image_pad|></slice>  Hi?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            layout.promptText(),
        )
        val sys =
            PromptBuilder(
                ChatFormat.minicpmV46(),
                useImageId = false,
                enableThinking = true,
            ).build("x", listOf(ImageLayout(1, null, emptyList())), system = " S ")
        assertEquals(
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image><|image_pad|></image>x<|im_end|>\n<|im_start|>assistant\n<think>\n",
            sys.promptText(),
        )
        assertFailsWith<IllegalArgumentException> { b.build("look: <|image_pad|>", listOf(one)) }
        assertFailsWith<IllegalArgumentException> { b.build("a video <|video_pad|>") }
        assertFailsWith<IllegalArgumentException> { ImageLayout(2, Size2(1, 2), listOf(1)) }
        assertEquals("a b", pyStrip("\u3000\u0085 a b\u001c\u2029"))
        val custom =
            SpecialTokens.fromTokenizerConfig(
                Json.parse("""{"extra_special_tokens": {"image_token": {"content": "<IMG>"}, "slice_start_token": "<S>"}}"""),
            )
        assertEquals(SpecialTokens(imageToken = "<IMG>", sliceStart = "<S>"), custom)
    }

    // ---- slice config, manifest ------------------------------------------------------------------------

    @Test
    fun sliceConfigReadsLegacyAndNested() {
        val cfg =
            SliceConfig.fromJson(
                Json.parse(
                    """{"image_processor": {"norm_mean": 0.25, "norm_std": [0.1, 0.2, 0.3], "max_slice_nums": 4.0, "downsample_mode": "4x"}}""",
                ),
            )
        assertEquals(listOf(0.25, 0.25, 0.25), cfg.imageMean)
        assertEquals(listOf(0.1, 0.2, 0.3), cfg.imageStd)
        assertEquals(4, cfg.maxSliceNums)
        assertEquals("4x", cfg.downsampleMode)
        assertEquals(448, cfg.scaleResolution)
        assertFailsWith<IllegalArgumentException> { SliceConfig.fromJson(Json.parse("""{"downsample_mode": "8x"}""")) }
        assertFailsWith<IllegalArgumentException> { SliceConfig.fromJson(Json.parse("""{"resample": 2}""")) }
        assertFailsWith<JsonException> { SliceConfig.fromJson(Json.parse("""{"patch_size": 14.5}""")) }
    }

    private fun manifestBytes(): ByteArray = javaClass.getResourceAsStream("/manifest-onnx-fp32.json")!!.readBytes()

    @Test
    fun manifestChecksumAndFields() {
        val m = BundleManifest.parse(manifestBytes())
        assertEquals("915821a2c2be1391ab91f1f5c28490d03b5d206a3cff774fa324cf6532d9e7ab", m.manifestSha256)
        assertEquals(listOf("minicpm-v-4.6", "onnx", "fp32"), listOf(m.family, m.format, m.quantization))
        assertEquals(70, m.sliceConfig.numPatchesPerSide)
        assertEquals("chat_template.jinja", m.chatTemplateFile)
        assertTrue(m.files.contains("tokenizer.json"))
        // any change to the content is refused
        val text = String(manifestBytes(), Charsets.UTF_8)
        val tampered = text.replace("\"max_slice_nums\": 4", "\"max_slice_nums\": 5")
        assertTrue(tampered != text)
        val err = assertFailsWith<BundleException> { BundleManifest.parse(tampered.toByteArray()) }
        assertTrue(err.message!!.contains("manifest_sha256 mismatch"), err.message)
        // reformatting (indentation, key order) is not a change
        val reordered =
            Json.writePretty(
                JsonObject(
                    Json
                        .parse(manifestBytes())
                        .obj()
                        .fields.entries
                        .reversed()
                        .associate { it.toPair() },
                ),
            )
        assertEquals(m.manifestSha256, BundleManifest.parse(reordered.toByteArray()).manifestSha256)
    }

    /** The test manifest with model.rope_positions set (and no manifest_sha256, so the edit is not tampering). */
    private fun manifestWithRopePositions(value: String): ByteArray {
        val obj = Json.parse(manifestBytes()).obj()
        val model = JsonObject(obj.req("model").obj().fields + ("rope_positions" to JsonString(value)))
        val fields = obj.fields.filterKeys { it != "manifest_sha256" } + ("model" to model)
        return Json.write(JsonObject(fields)).toByteArray()
    }

    @Test
    fun manifestRefusesCanvasRopePositions() {
        assertEquals("cache", BundleManifest.parse(manifestBytes()).ropePositions) // absent: the cache index
        assertEquals("cache", BundleManifest.parse(manifestWithRopePositions("cache")).ropePositions)
        val err = assertFailsWith<BundleException> { BundleManifest.parse(manifestWithRopePositions("canvas")) }
        assertTrue(err.message!!.contains("model.rope_positions \"canvas\""), err.message)
        assertTrue(err.message!!.contains("minicpmv-edge chat --bundle"), err.message)
        assertEquals(1, err.message!!.lines().size)
    }

    // ---- device report ---------------------------------------------------------------------------------

    @Test
    fun deviceReport() {
        val m = BundleManifest.parse(manifestBytes())
        val settings = ReportSettings("shapes.png", 134, 164, "16x", 4, 64)
        val b = DeviceReportBuilder(m, DeviceFacts("Pixel \"8\" Pro", "14 (API 34)", "0.1.0"), settings)
        assertFailsWith<IllegalStateException> { b.toJson() }
        b.addRun(ReportRun(ttftMs = 812.5, decodeTokS = 21.25, decodeTokens = 64, imageDecodeMs = 12.0, preprocessMs = 3.5))
        b.addRun(ReportRun(ttftMs = 790.0, decodeTokS = 22.0, decodeTokens = 64, peakRssMb = 0.0))
        assertFailsWith<IllegalArgumentException> { ReportRun(ttftMs = 0.0, decodeTokS = 1.0, decodeTokens = 64) }
        assertFailsWith<IllegalArgumentException> { ReportRun(ttftMs = 1.0, decodeTokS = Double.NaN, decodeTokens = 64) }
        assertFailsWith<IllegalArgumentException> { ReportRun(ttftMs = 1.0, decodeTokS = 1.0, decodeTokens = 64, visionMs = -1.0) }
        val text = b.toJson()
        val r = Json.parse(text).obj()
        assertEquals(1, r.req("schema_version").int())
        assertEquals("android", r.req("platform").str())
        assertEquals("Pixel \"8\" Pro", r.req("device").str())
        assertEquals(
            listOf("onnx", "fp32", m.manifestSha256),
            r.req("bundle").obj().let { bb ->
                listOf("format", "quantization", "manifest_sha256").map { bb.req(it).str() }
            },
        )
        assertEquals(
            listOf("shapes.png", "16x"),
            listOf(
                r
                    .req("settings")
                    .obj()
                    .req("image")
                    .str(),
                r
                    .req("settings")
                    .obj()
                    .req("downsample_mode")
                    .str(),
            ),
        )
        val runs =
            r
                .req("runs")
                .arr()
                .items
                .map { it.obj() }
        assertEquals(listOf(812.5, 790.0), runs.map { it.req("ttft_ms").double() })
        assertEquals(listOf(21.25, 22.0), runs.map { it.req("decode_tok_s").double() })
        assertEquals(3.5, runs[0].req("preprocess_ms").double())
        assertTrue(!runs[1].has("preprocess_ms") && runs[1].req("peak_rss_mb").double() == 0.0)
        val out = System.getenv("DEVICE_REPORT_OUT")
        if (!out.isNullOrEmpty()) java.io.File(out).writeText(text) // checked by tests/test_android_core.py with bench's reader
    }
}
